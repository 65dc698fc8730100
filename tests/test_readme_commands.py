"""The README's researcher commands work as written on the dev cluster.

The set-up block and the command block of "For researchers" are taken from README.md itself and
run in a login shell's environment without SLURM_CONF or AIMASS_SITE: if the README stops
telling a newcomer how to reach the dev cluster, this test fails. The example job ids (12, 13)
are replaced by the id of the job the block itself submitted; ``logs -f`` (which follows
forever) runs without ``-f``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]


def researcher_blocks() -> list[list[str]]:
    """The ```sh blocks of README's "For researchers" section, as lists of command lines."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## For researchers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [
        [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


def test_readme_has_a_setup_block_and_a_command_block():
    setup, commands = researcher_blocks()[:2]
    assert any("SLURM_CONF" in line or "dev-cluster env" in line for line in setup)
    assert any("AIMASS_SITE" in line for line in setup)
    assert any(line.startswith("aimass submit") for line in commands)


def test_researcher_commands_run_as_written(cluster, tmp_path):
    setup, commands = researcher_blocks()[:2]
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "AIMASS_SITE")}
    # `source .venv/bin/activate` needs the venv the test runs in: the checkout's own.
    assert (ROOT / ".venv" / "bin" / "activate").exists()
    job_id = None
    for line in commands:
        if job_id is None and re.search(r"\b12\b", line):
            pytest.fail(f"the README uses job 12 before submitting one: {line}")
        cmd = re.sub(r"\b12\b", job_id or "12", line)
        cmd = re.sub(r"\b13\b", job_id or "13", cmd)
        cmd = cmd.replace(" -f", "")
        if cmd.startswith("aimass cancel"):
            continue  # the job is done; cancelling a finished job is not what the line shows
        script = "set -e\n" + "\n".join(setup) + "\n" + cmd + "\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
        if cmd.startswith("aimass submit") and "--wait" in cmd:
            found = re.search(r"\bjob (\d+)\b", done.stdout + done.stderr)
            assert found, done.stdout + done.stderr
            job_id = found.group(1)
        if "--json" in cmd and cmd.startswith("aimass status"):
            rows = json.loads(done.stdout)
            assert any(str(r.get("job_id")) == job_id for r in rows), rows
    assert job_id is not None
