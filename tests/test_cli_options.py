"""Issue 11: one ``--site`` option, the same everywhere, on every command users reach for it.

Walks the whole (lazy) click tree; runs the commands through the real entry point against a
site named ``dev`` that lives under tmp_path (HOME is pointed there, so ``--site dev`` finds
``~/.config/aimass/sites/dev.toml`` first and nothing touches ~/aimass-dev).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from _sitefixtures import write_site

from aimass_hpc.cli import cli, main
from aimass_hpc.cli._options import SITE_HELP


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    yield " ".join(path), command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1] if path else "aimass")
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{' '.join((*path, name))} is listed but not found"
            yield from _walk(sub, (*path, name))


def _site_options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and "--site" in p.opts]


ALL = dict(_walk(cli))

# Commands that read a site (or that users reach for with one): each must take --site.
REACHED_FOR = [
    "render", "submit", "status", "wait", "logs", "cancel", "train", "plot",
    "models", "models ls", "models show", "models search", "models promote", "models rollback",
    "models rm", "models verify", "models export", "models import", "models gc",
    "models aliases",
    "search run", "search resume", "search status", "search cancel", "search plot",
    "serve start", "serve upgrade", "serve stop", "endpoints", "bench",
    "reserve create", "site check", "site show",
]  # fmt: skip


def test_the_tree_is_walked() -> None:
    assert {"status", "models ls", "search status", "serve start", "site show"} <= set(ALL)


@pytest.mark.parametrize("name", REACHED_FOR)
def test_commands_users_reach_for_take_site(name: str) -> None:
    assert len(_site_options(ALL[name])) == 1, f"`aimass {name}` has no --site"


def test_every_site_option_is_the_same_option() -> None:
    seen = {name: _site_options(cmd) for name, cmd in ALL.items()}
    with_site = {name: opts for name, opts in seen.items() if opts}
    assert len(with_site) >= len(REACHED_FOR)
    for name, opts in with_site.items():
        (opt,) = opts
        assert opt.help == SITE_HELP, f"`aimass {name} --site` has its own help: {opt.help!r}"
        assert opt.opts == ["--site"] and opt.metavar == "NAME|PATH", name
        assert opt.default is None and not opt.multiple and opt.envvar is None, name


# --------------------------------------------------------------------------- running them


@pytest.fixture
def dev_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site called ``dev`` found by name, its runs and models under tmp_path; its root."""
    site = write_site(tmp_path, "dev")
    home = tmp_path / "home"
    sites = home / ".config" / "aimass" / "sites"
    sites.mkdir(parents=True)
    shutil.copy(site.source, sites / "dev.toml")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    monkeypatch.delenv("AIMASS_REPO", raising=False)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _one_line_error(code: int, err: str, exit_code: int, words: str) -> None:
    assert code == exit_code, err
    assert err.startswith("aimass: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err


def test_models_ls_site_after_the_subcommand(dev_named: Path, capsys) -> None:
    models = dev_named / "models"
    code, _, err = run(capsys, "models", "ls", "--site", "dev", "--json")
    _one_line_error(code, err, 3, f"no model repository at {models}")
    # Once the repository exists, the same command lists it (empty).
    from aimass_hpc.repo import ModelRepository

    ModelRepository(models, create=True)
    for argv in (("models", "ls", "--site", "dev"), ("models", "--site", "dev", "ls")):
        code, out, err = run(capsys, *argv, "--json")
        assert (code, json.loads(out)) == (0, []), err


def test_models_site_flag_beats_aimass_repo(dev_named: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AIMASS_REPO", str(dev_named / "elsewhere"))
    code, _, err = run(capsys, "models", "ls", "--site", "dev")
    _one_line_error(code, err, 3, f"no model repository at {dev_named / 'models'}")
    code, _, err = run(capsys, "models", "ls")  # without --site, $AIMASS_REPO as before
    _one_line_error(code, err, 3, f"no model repository at {dev_named / 'elsewhere'}")


def test_search_status_looks_under_the_sites_searches(dev_named: Path, capsys) -> None:
    code, _, err = run(capsys, "search", "status", "lr-sweep", "--site", "dev", "--json")
    _one_line_error(code, err, 3, f"no search 'lr-sweep' under {dev_named / 'runs' / 'searches'}")
    # A path is still a path: --site does not turn it into a name.
    code, _, err = run(capsys, "search", "plot", str(dev_named / "nope"), "--site", "dev")
    _one_line_error(code, err, 3, "no search journal in")


def test_status_and_endpoints_take_site(dev_named: Path, capsys) -> None:
    code, out, err = run(capsys, "status", "--site", "dev", "--json")
    assert (code, json.loads(out)) == (0, []), err
    code, out, err = run(capsys, "endpoints", "--site", "dev", "--json", "--no-probe")
    assert (code, json.loads(out)) == (0, []), err


def test_unknown_site_is_one_line(dev_named: Path, capsys) -> None:
    for argv in (("models", "ls"), ("search", "status", "x"), ("status",), ("endpoints",)):
        code, _, err = run(capsys, *argv, "--site", "nosuchsite")
        _one_line_error(code, err, 3, "unknown site 'nosuchsite'")


def test_site_show_takes_site_or_argument(dev_named: Path, capsys) -> None:
    code, out, _ = run(capsys, "site", "show", "--site", "dev", "--json")
    assert code == 0 and json.loads(out)["filesystems"]["runs"] == str(dev_named / "runs")
    code, out2, _ = run(capsys, "site", "show", "dev", "--json")
    assert code == 0 and out2 == out
    code, _, err = run(capsys, "site", "show", "dev", "--site", "local")
    _one_line_error(code, err, 2, "two sites given")


def test_reserve_create_defaults_to_the_sites_serving_partition(tmp_path: Path, capsys) -> None:
    site = write_site(tmp_path, "dev", serving={"partition": "debug"})
    argv = ("reserve", "create", "r1", "--node-count", "1", "--users", "me", "--dry-run")
    code, out, _ = run(capsys, *argv, "--site", str(site.source))
    assert code == 0 and "partitionname=debug" in out
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "partitionname" not in out
    local = write_site(tmp_path, "local")
    code, _, err = run(capsys, *argv, "--site", str(local.source))
    _one_line_error(code, err, 2, "has no reservations")


def test_search_status_by_name_under_the_site(dev_named: Path, capsys) -> None:
    """``aimass search status quad --site dev``: the newest search of that name."""
    from aimass_hpc.config.search_spec import load_search_spec
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.search_driver import create_search

    spec_path = dev_named / "search.toml"
    spec_path.write_text(
        '[search]\nname = "quad"\nbudget = 2\nparallel = 1\n\n'
        '[objective]\ncommand = ["{python}", "objective.py", "{x}"]\n\n'
        '[space]\nx = {type = "float", low = -1.0, high = 1.0}\n',
        encoding="utf-8",
    )
    spec = load_search_spec(str(spec_path))
    site = load_site("dev")
    older = create_search(
        spec, site, directory=site.runs_root / "searches" / "20200101-000000-quad-aa"
    )
    newer = create_search(spec, site)
    for argv in (("search", "status", "quad"), ("search", "status", older.path.name)):
        code, out, err = run(capsys, *argv, "--site", "dev", "--json")
        assert code == 0, err
        expected = newer if argv[-1] == "quad" else older
        assert json.loads(out)["search_dir"] == str(expected.path)
    code, _, err = run(capsys, "search", "status", "quad")  # a name needs --site
    _one_line_error(code, err, 3, "no search journal in")


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "1e400", "abc", "1" * 400])
@pytest.mark.parametrize(
    "argv",
    [
        ["wait", "1", "--timeout"],
        ["serve", "start", "m:1", "--timeout"],
        ["serve", "upgrade", "m@prod", "--timeout"],
        ["search", "cancel", "somewhere", "--wait"],
    ],
)
def test_timeouts_are_finite_seconds(argv: list[str], bad: str) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [*argv, bad])
    assert result.exit_code == 2, result.output
    assert "is not a number of seconds >= 0" in result.output
    assert len(result.output) < 400  # a long value is cut in the message
