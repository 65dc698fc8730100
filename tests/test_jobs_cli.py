"""The researcher- and admin-facing CLI: one-line errors, exit codes, JSON output.

Runs the real ``aimass`` entry point on the local (subprocess) site; the same commands against
the Slurm cluster are in test_jobs_cluster.py.
"""

from __future__ import annotations

import json
import os

import pytest
from _sitefixtures import dumps_toml, local_site, site_data  # noqa: F401 - fixture

from aimass_hpc.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\nname = "cli job"\ncommand = ["bash", "-c", "echo from-the-job"]\n')
    return path


def test_submit_wait_status_logs(capsys, local_site, spec):  # noqa: F811
    site = local_site.source
    code, out, _ = run_cli(capsys, "submit", "--site", site, str(spec), "--wait", "--json")
    assert code == 0
    result = json.loads(out)
    job_id = result["job_id"]
    assert result["status"]["state"] == "COMPLETED"
    code, out, _ = run_cli(capsys, "status", "--site", site, "--json")
    (row,) = json.loads(out)
    assert row["job_id"] == job_id and row["name"] == "cli job" and row["state"] == "COMPLETED"
    code, out, _ = run_cli(capsys, "status", "--site", site, job_id)
    assert code == 0 and "COMPLETED" in out and "cli job" in out
    code, out, _ = run_cli(capsys, "logs", "--site", site, job_id)
    assert code == 0 and "from-the-job" in out
    code, out, _ = run_cli(capsys, "logs", "--site", site, job_id, "-f")
    assert code == 0 and "from-the-job" in out
    code, out, _ = run_cli(capsys, "wait", "--site", site, job_id)
    assert code == 0
    code, out, _ = run_cli(capsys, "cancel", "--site", site, job_id)
    assert code == 0 and "already finished" in out


def test_failed_job_makes_wait_exit_1(capsys, local_site, tmp_path):  # noqa: F811
    path = tmp_path / "fail.toml"
    path.write_text('[job]\nname = "f"\ncommand = ["false"]\n')
    code, _, _ = run_cli(capsys, "submit", "--site", local_site.source, str(path), "--wait")
    assert code == 1


def test_unknown_jobs_exit_3_naming_them(capsys, local_site):  # noqa: F811
    site = local_site.source
    for cmd in ("cancel", "status", "wait"):
        code, _, err = run_cli(capsys, cmd, "--site", site, "98765")
        assert code == 3, cmd
        assert err.strip().splitlines()[-1] == "aimass: error: unknown job id(s): 98765"
    code, _, err = run_cli(capsys, "logs", "--site", site, "98765")
    assert code == 3 and "98765" in err


def test_dry_run_and_render_print_the_script(capsys, local_site, spec):  # noqa: F811
    code, out, _ = run_cli(capsys, "submit", "--site", local_site.source, str(spec), "--dry-run")
    assert code == 0 and out.startswith("#!/bin/bash\n") and "echo from-the-job" in out
    assert not local_site.runs_root.exists()
    code, out2, _ = run_cli(capsys, "render", "--site", local_site.source, str(spec))
    assert code == 0 and out2 == out.replace(
        out.split("AIMASS_RUN_DIR=")[1].split("\n")[0],
        out2.split("AIMASS_RUN_DIR=")[1].split("\n")[0],
    )


def test_input_errors_are_one_line_exit_2(capsys, local_site, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\nname = "x"\ncommand = ["true"]\ngpus_per_node = 1\n')
    code, out, err = run_cli(capsys, "submit", "--site", local_site.source, str(bad))
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        "aimass: error: gpus_per_node: 1 GPUs per node asked, partition 'local' nodes have 0"
    )
    code, _, err = run_cli(capsys, "submit", "--site", local_site.source, str(tmp_path / "no.toml"))
    assert code == 2 and "spec file not found" in err
    code, _, err = run_cli(
        capsys, "submit", "--site", local_site.source, "--sbatch-arg", "--time=5", str(bad)
    )
    assert code == 2 and "--time is set by aimass" in err


@pytest.mark.parametrize("command", ["render", "submit"])
def test_odd_paths_are_one_line_input_errors(capsys, local_site, tmp_path, command):  # noqa: F811
    site = local_site.source
    latin1 = tmp_path / "latin1.sh"
    latin1.write_bytes(b"#!/bin/bash\necho caf\xe9\n")
    fifo, fifo_spec = tmp_path / "pipe.sh", tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    os.mkfifo(fifo_spec)  # reading either would block forever
    (tmp_path / "dir.toml").mkdir()
    cases = {
        str(tmp_path): "is a directory",
        str(tmp_path / "dir.toml"): "is a directory",
        str(tmp_path / "missing.sh"): "batch script not found",
        str(tmp_path / "missing.toml"): "spec file not found",
        str(latin1): "the batch script is not UTF-8 text",
        str(fifo): "not a regular file",
        str(fifo_spec): "not a regular file",
    }
    for path, message in cases.items():
        code, out, err = run_cli(capsys, command, "--site", site, path)
        assert code == 2, (path, err)
        assert out == "" and "Traceback" not in err
        (line,) = err.strip().splitlines()
        assert line.startswith("aimass: error: ") and message in line, (path, line)
    assert not local_site.runs_root.exists() or not any(local_site.runs_root.iterdir())


def test_render_prints_a_script_byte_for_byte(capsys, local_site, tmp_path):  # noqa: F811
    """No ANSI stripping (click.echo drops escapes when stdout is no terminal), no rich markup,
    no newline added at the end, no wrapping."""
    text = (
        "#!/bin/bash\necho '\x1b[31mred\x1b[0m [bold]not markup[/bold] \u00e9'\n"
        f"echo {'x' * 400}\r\n# no newline at the end"
    )
    script = tmp_path / "exact.sh"
    script.write_bytes(text.encode())
    code, out, _ = run_cli(capsys, "render", "--site", local_site.source, str(script))
    assert code == 0 and out == text
    code, out, _ = run_cli(capsys, "submit", "--site", local_site.source, str(script), "--dry-run")
    assert code == 0 and out == text


def test_status_table_shows_names_as_they_are(capsys, local_site, tmp_path):  # noqa: F811
    path = tmp_path / "markup.toml"
    path.write_text('[job]\nname = "[red]x[/] [bold]y"\ncommand = ["true"]\n')
    site = local_site.source
    code, out, err = run_cli(capsys, "submit", "--site", site, str(path), "--wait", "--json")
    assert code == 0, err
    job_id = json.loads(out)["job_id"]
    code, out, err = run_cli(capsys, "status", "--site", site, job_id)
    assert code == 0 and "Traceback" not in err, err
    assert "[red]x[/] [bold]y" in out  # not read as rich markup


def test_no_site_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.delenv("AIMASS_SITE", raising=False)
    code, _, err = run_cli(capsys, "status")
    assert code == 2 and "no site given" in err


def test_site_check_reports_every_problem(capsys, tmp_path):
    data = site_data("dev")
    data["partitions"]["debug"]["defualt"] = True
    data["partitions"]["debug"]["gpus_per_node"] = -2
    data["training"]["partition"] = "gpu"
    path = tmp_path / "broken.toml"
    path.write_text(dumps_toml(data))
    code, out, err = run_cli(capsys, "site", "check", str(path))
    assert code == 2
    assert "partitions.debug.defualt: unknown key (did you mean 'default'?)" in out
    assert "partitions.debug.gpus_per_node:" in out
    assert "3 problem(s)" in err or "2 problem(s)" in err
    code, out, _ = run_cli(capsys, "site", "check", str(path), "--json")
    assert {p["path"] for p in json.loads(out)} >= {
        "partitions.debug.defualt",
        "partitions.debug.gpus_per_node",
    }


@pytest.mark.parametrize("name", ["dev", "local", "example-hpc"])
def test_site_check_passes_bundled_sites(capsys, name):
    code, out, _ = run_cli(capsys, "site", "check", name)
    assert code == 0 and "ok" in out


def test_site_list_and_show(capsys):
    code, out, _ = run_cli(capsys, "site", "list", "--json")
    assert {"dev", "local", "example-hpc"} <= {row["name"] for row in json.loads(out)}
    code, out, _ = run_cli(capsys, "site", "show", "example-hpc", "--json")
    shown = json.loads(out)
    assert shown["partitions"]["h100"]["gpus_per_node"] == 8
    code, out, _ = run_cli(capsys, "site", "show", "dev")
    assert code == 0 and "debug" in out and "fake" in out
    code, _, err = run_cli(capsys, "site", "show", "nope")
    assert code == 3 and "unknown site 'nope'" in err
