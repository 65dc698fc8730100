"""The CLI is thin: its work lives in ``aimass_hpc.launch`` (issue 11).

An AST check that no ``aimass_hpc/cli`` module runs programs, renders job scripts or writes a
search journal itself; and direct tests of the launch functions the CLI now calls (the pure
ones: reservation parsing and the scontrol command line, site checking).
"""

from __future__ import annotations

import ast
import getpass
import shlex
from pathlib import Path

import pytest
from _sitefixtures import dumps_toml, site_data

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError
from aimass_hpc.config.site import BUNDLED_SITES
from aimass_hpc.launch import reservations as R
from aimass_hpc.launch.search_launch import find_search, is_plain_name
from aimass_hpc.launch.site_check import check_site

CLI_DIR = Path(__file__).resolve().parents[1] / "aimass_hpc" / "cli"
CLI_MODULES = sorted(CLI_DIR.glob("*.py"))

# `aimass render` prints render_request's script: rendering IS that command's one call.
RENDER_ALLOWED = {"jobs.py"}


def _imports(tree: ast.AST) -> set[str]:
    """Every module a file imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _journal_appends(tree: ast.AST) -> list[int]:
    """Lines calling ``.append``/``.append_many`` on ``X.journal()``, ``Journal(...)``,
    ``Journal.in_dir(...)`` or a name/attribute called ``journal``."""
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("append", "append_many"):
            continue
        target = node.func.value
        if isinstance(target, ast.Call):
            target = target.func
        name = (
            target.attr
            if isinstance(target, ast.Attribute)
            else target.id
            if isinstance(target, ast.Name)
            else ""
        )
        if name in ("journal", "Journal", "in_dir"):
            lines.append(node.lineno)
    return lines


def test_there_are_cli_modules_to_check():
    assert {"search.py", "site.py", "reserve.py"} <= {p.name for p in CLI_MODULES}


@pytest.mark.parametrize("path", CLI_MODULES, ids=lambda p: p.name)
def test_cli_modules_do_no_work_themselves(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imports = _imports(tree)
    assert "subprocess" not in imports, f"{path.name} runs programs: move that into launch"
    if path.name not in RENDER_ALLOWED:
        rendering = {m for m in imports if m.startswith("aimass_hpc.launch.render")}
        assert not rendering, f"{path.name} renders job scripts itself: {sorted(rendering)}"
    assert not _journal_appends(tree), (
        f"{path.name} writes a search journal (lines {_journal_appends(tree)}): use launch"
    )


def test_the_journal_check_sees_a_journal_append():
    code = "sdir.journal().append(J.CANCEL_REQUESTED)\njournal.append('x')\nrows.append(1)\n"
    assert _journal_appends(ast.parse(code)) == [1, 2]


# ------------------------------------------------------------------------------ reservations


def test_create_argv_is_the_exact_scontrol_command():
    argv = R.create_argv("svc", nodes="node[1-2]", partition="debug", users="alice", duration="120")
    assert argv == [
        "scontrol",
        "create",
        "reservation",
        "reservationname=svc",
        "starttime=now",
        "duration=120",
        "nodes=node[1-2]",
        "partitionname=debug",
        "users=alice",
    ]


def test_create_argv_defaults_to_the_current_user_and_counts_nodes():
    argv = R.create_argv("svc", node_count=2)
    assert "nodecnt=2" in argv
    assert f"users={getpass.getuser()}" in argv
    with_accounts = R.create_argv("svc", node_count=1, accounts="proj")
    assert "accounts=proj" in with_accounts
    assert not any(a.startswith("users=") for a in with_accounts)


def test_create_argv_refuses_bad_input_in_one_line():
    with pytest.raises(InputError, match="--nodes LIST or --node-count N"):
        R.create_argv("svc", users="alice")
    with pytest.raises(InputError, match="NAME"):
        R.create_argv("bad name", node_count=1, users="alice")
    with pytest.raises(InputError, match="--start"):
        R.create_argv("svc", node_count=1, users="alice", start="now flags=maint")


def test_create_argv_takes_the_site_serving_partition(tmp_path):
    from _sitefixtures import write_site

    site = write_site(
        tmp_path, "dev", serving={**site_data("dev")["serving"], "partition": "debug"}
    )
    argv = R.create_argv("svc", node_count=1, users="alice", site_ref=site.source)
    assert "partitionname=debug" in argv
    explicit = R.create_argv("svc", node_count=1, users="alice", site_ref=site.source,
                             partition="other")  # fmt: skip
    assert "partitionname=other" in explicit
    with pytest.raises(InputError, match="without Slurm"):
        R.create_argv("svc", node_count=1, users="alice", site_ref="local")


def test_dry_run_text_round_trips():
    argv = R.create_argv("svc", nodes="n1", users="alice", flags="ignore_jobs")
    assert shlex.split(shlex.join(argv)) == argv


def test_parse_reservations_reads_one_line_each():
    text = (
        "ReservationName=a StartTime=2024-01-01T00:00:00 Nodes=n[1-2] Users=alice Flags=\n"
        "garbage line\n"
        "  ReservationName=b State=ACTIVE Nodes=n3 Odd\n"
    )
    rows = R.parse_reservations(text)
    assert R.reservation_names(rows) == ["a", "b"]
    assert rows[0]["Nodes"] == "n[1-2]" and rows[0]["Flags"] == ""
    assert rows[1] == {"ReservationName": "b", "State": "ACTIVE", "Nodes": "n3"}
    assert R.parse_reservations("No reservations in the system\n") == []


def test_explain_failure_maps_scontrol_messages():
    assert isinstance(R.explain_failure("create", "r", "Invalid user id\n"), ConflictError)
    assert isinstance(
        R.explain_failure("delete", "r", "Requested reservation is invalid"), NotFoundError
    )
    assert isinstance(R.explain_failure("create", "r", "Reservation overlaps"), ConflictError)
    other = R.explain_failure("create", "r", "")
    assert isinstance(other, SchedulerError) and "no output" in str(other)


# ------------------------------------------------------------------------------ site check


def test_check_site_passes_the_bundled_dev_site():
    result = check_site("dev")
    assert result.path == BUNDLED_SITES / "dev.toml"
    assert result.problems == [] and result.ok


def test_check_site_names_the_key_of_a_broken_value(tmp_path):
    data = site_data("dev")
    data["partitions"]["debug"]["gpus_per_node"] = -1
    path = tmp_path / "broken.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    result = check_site(str(path))
    assert result.path == path
    assert [p.path for p in result.problems] == ["partitions.debug.gpus_per_node"]


def test_check_site_renders_the_templates(tmp_path):
    # Directory form: a job.j2 next to site.toml overrides the bundled one.
    folder = tmp_path / "mysite"
    folder.mkdir()
    data = site_data("dev")
    data["name"] = "mysite"
    (folder / "site.toml").write_text(dumps_toml(data), encoding="utf-8")
    (folder / "job.j2").write_text("#!/bin/bash\nif then fi\n", encoding="utf-8")
    result = check_site(str(folder / "site.toml"))
    paths = [p.path for p in result.problems]
    # The other templates extend job.j2, so they break with it.
    assert paths[0] == "templates.job.j2"
    assert all(p.startswith("templates.") for p in paths)
    assert "not valid bash" in result.problems[0].message


def test_check_site_without_a_site_is_one_error(monkeypatch):
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    with pytest.raises(InputError, match="no site given"):
        check_site(None)


# ------------------------------------------------------------------------------ searches


def test_plain_names_are_not_paths():
    assert is_plain_name("mysearch")
    for text in ("", ".", "..", "a/b", "a*", "x\0y", "a[1]"):
        assert not is_plain_name(text)


def test_find_search_takes_the_exact_dir_else_the_newest(tmp_path):
    from _sitefixtures import write_site

    site = write_site(tmp_path, "dev")
    root = site.runs_root / "searches"
    for name in ("20240101-000000-sweep-abc123", "20240202-000000-sweep-00ff00", "x-sweep-1"):
        (root / name).mkdir(parents=True)
    assert find_search("sweep", site) == root / "20240202-000000-sweep-00ff00"
    (root / "sweep").mkdir()
    assert find_search("sweep", site) == root / "sweep"
    with pytest.raises(NotFoundError, match="no search 'other'"):
        find_search("other", site)
