"""The ``aimass`` CLI end to end on the real local cluster (what `make demo` does)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import dev_site  # noqa: F401 - fixture

from aimass_hpc.config.site import PACKAGE_ROOT

pytestmark = pytest.mark.cluster
HELLO = PACKAGE_ROOT / "examples" / "hello" / "hello.toml"


def aimass(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (SLURM_CONF comes from the cluster fixture's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True, timeout=300
    )


def test_hello_example_end_to_end(cluster, dev_site):  # noqa: F811
    site = dev_site.source
    proc = aimass("submit", "--site", site, str(HELLO), "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"]["state"] == "COMPLETED"
    job_id = result["job_id"]
    logs = aimass("logs", "--site", site, job_id)
    lines = [ln for ln in logs.stdout.splitlines() if ln.startswith("hello from")]
    assert len(lines) == 4
    assert all("CUDA_VISIBLE_DEVICES=" in ln and "unset" not in ln for ln in lines)
    assert all("greeting=hi there; nothing in here $(runs)" in ln for ln in lines)
    status = aimass("status", "--site", site)
    assert status.returncode == 0 and job_id in status.stdout and "COMPLETED" in status.stdout


def test_plain_script_cancel_and_unknown_ids(cluster, dev_site, tmp_path):  # noqa: F811
    site = dev_site.source
    script = tmp_path / "sleepy.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=5\necho started in $AIMASS_RUN_DIR\nsleep 120\n")
    proc = aimass("submit", "--site", site, str(script), "--json")
    assert proc.returncode == 0, proc.stderr
    job_id = json.loads(proc.stdout)["job_id"]
    cancel = aimass("cancel", "--site", site, job_id)
    assert cancel.returncode == 0 and f"cancelled {job_id}" in cancel.stdout
    waited = aimass("wait", "--site", site, job_id, "--json")
    assert waited.returncode == 1 and json.loads(waited.stdout)[0]["state"] == "CANCELLED"
    unknown = aimass("cancel", "--site", site, "999998", job_id)
    assert unknown.returncode == 3
    assert unknown.stderr.strip() == "aimass: error: unknown job id(s): 999998"


def test_logs_follow_stops_when_the_job_ends(cluster, dev_site, tmp_path):  # noqa: F811
    spec = tmp_path / "tick.toml"
    spec.write_text(
        '[job]\nname = "tick"\ntime = "5"\n'
        'command = ["bash", "-c", "for i in 1 2 3; do echo tick $i; sleep 1; done"]\n'
    )
    proc = aimass("submit", "--site", dev_site.source, str(spec), "--json")
    job_id = json.loads(proc.stdout)["job_id"]
    follow = aimass("logs", "--site", dev_site.source, job_id, "-f")
    assert follow.returncode == 0
    assert [ln for ln in follow.stdout.splitlines() if ln.startswith("tick")] == [
        "tick 1",
        "tick 2",
        "tick 3",
    ]


def _run_dir_token(script: bytes) -> bytes:
    """The (shell-quoted) run directory as it appears on the script's AIMASS_RUN_DIR line."""
    match = re.search(rb"^export AIMASS_RUN_DIR=(.*)$", script, re.MULTILINE)
    assert match, script[:400]
    return match.group(1)


def test_render_and_dry_run_print_exactly_the_submitted_script(cluster, dev_site, tmp_path):  # noqa: F811
    """The bytes ``render`` and ``--dry-run`` print are the bytes sbatch gets (job.sh), but for
    the run directory's name: escapes, markup-like text and long lines pass untouched."""
    spec = tmp_path / "exact.toml"
    shown = "\\u001b[31mred\\u001b[0m [bold]not markup[/bold] caf\\u00e9 " + "x" * 300
    spec.write_text(
        '[job]\nname = "exact"\ntime = "2"\ncommand = ["bash", "-c", "echo \\"$SHOWN\\""]\n'
        f'env = {{ SHOWN = "{shown}" }}\n'
    )
    site = dev_site.source
    argv = [sys.executable, "-m", "aimass_hpc"]
    rendered = subprocess.run([*argv, "render", "--site", site, str(spec)], capture_output=True)
    dry = subprocess.run(
        [*argv, "submit", "--site", site, str(spec), "--dry-run"], capture_output=True
    )
    dry_json = aimass("submit", "--site", site, str(spec), "--dry-run", "--json")
    real = aimass("submit", "--site", site, str(spec), "--json")
    assert rendered.returncode == dry.returncode == dry_json.returncode == real.returncode == 0
    job_sh = (Path(json.loads(real.stdout)["run_dir"]) / "job.sh").read_bytes()
    assert b"\x1b[31mred" in job_sh and b"[bold]not markup[/bold]" in job_sh
    token = _run_dir_token(job_sh)
    for printed in (rendered.stdout, dry.stdout):
        assert printed.replace(_run_dir_token(printed), token) == job_sh
    script = json.loads(dry_json.stdout)["script"].encode()
    assert script.replace(_run_dir_token(script), token) == job_sh
