"""``aimass site check --live`` against the real local cluster (scripts/dev-cluster).

Where the dev cluster cannot show a mismatch by itself (its partition has no MaxTime, its srun
offers every MPI type a site may name) a wrapper first on ``PATH`` edits the real command's
reply, as tests/test_scheduler_faults_cluster.py does: every call still reaches the real
daemons. The same wrappers make the controller unreachable or slow. The daemons are never
touched (other tests share the cluster).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import dumps_toml, site_data

from aimass_hpc.config.site import BUNDLED_SITES

pytestmark = pytest.mark.cluster

UNREACHABLE = "slurm_load_partitions: Unable to contact slurm controller (connect failure)"


class Wrappers:
    """scontrol, sinfo and srun wrappers; switches are files in ``root``."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for name in ("scontrol", "sinfo", "srun"):
            real = shutil.which(name)
            assert real is not None, f"{name} is not installed"
            path = self.bin / name
            path.write_text(self._script(name, shlex.quote(real)))
            path.chmod(0o755)

    def _script(self, name: str, real: str) -> str:
        down = shlex.quote(str(self.dir / "down"))
        hung = shlex.quote(str(self.dir / "hung"))
        edit = shlex.quote(str(self.dir / f"{name}.sed"))
        return f"""#!/bin/bash
# {name}: fails while {down} exists, hangs while {hung} exists, else the real reply
# (edited by the sed script {edit} when it exists)
if [ -e {down} ]; then echo {shlex.quote(UNREACHABLE)} >&2; exit 1; fi
if [ -e {hung} ]; then exec sleep 60; fi
if [ -e {edit} ]; then {real} "$@" 2>&1 | sed -f {edit}; exit "${{PIPESTATUS[0]}}"; fi
exec {real} "$@"
"""

    def switch(self, name: str, content: str = "") -> None:
        (self.dir / name).write_text(content)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def wrappers(cluster, tmp_path: Path) -> Wrappers:
    return Wrappers(tmp_path / "wrappers")


def aimass(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _broken_dev(tmp_path: Path) -> Path:
    """dev.toml with six things the cluster contradicts."""
    data = site_data("dev")
    data["partitions"]["debug"]["gpus_per_node"] = 8
    data["partitions"]["gpu"] = {"gpus_per_node": 4, "gpu_type": "fake"}
    data["partitions"]["debug"]["max_time"] = "2-00:00:00"
    data["partitions"]["debug"]["default_time"] = "1-00:00:00"
    data["account"] = "no-such-account"
    data["serving"]["default_reservation"] = "no-such-reservation"
    data["mpi"]["srun_mpi"] = "pmix"
    path = tmp_path / "broken-dev.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    return path


def test_the_dev_site_matches_the_cluster(cluster):
    result = aimass("site", "check", "dev", "--live")
    assert result.returncode == 0, result.stderr
    assert f"{BUNDLED_SITES / 'dev.toml'}: ok" in result.stdout
    assert "matches the cluster" in result.stdout
    result = aimass("site", "check", "dev", "--live", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stderr


def test_every_mismatch_is_named_in_one_run(wrappers: Wrappers, tmp_path: Path):
    path = _broken_dev(tmp_path)
    # The real cluster alone contradicts four of them.
    result = aimass("site", "check", str(path), "--live", "--json")
    assert result.returncode == 2, result.stderr
    assert "4 problem(s)" in result.stderr and len(result.stderr.splitlines()) == 1
    problems = {p["path"]: p for p in json.loads(result.stdout)}
    assert set(problems) == {
        "partitions.debug.gpus_per_node",
        "partitions.gpu",
        "account",
        "serving.default_reservation",
    }
    assert problems["partitions.debug.gpus_per_node"]["message"] == (
        "config says 8, cluster nodes of partition debug have 4 (gres gpu:fake:4)"
    )
    assert problems["partitions.gpu"]["message"] == "no partition 'gpu' on the cluster"
    assert "no association with account 'no-such-account'" in problems["account"]["message"]
    # As if the admins had set MaxTime=12:00:00 and built srun without PMIx.
    wrappers.switch("scontrol.sed", "s/MaxTime=UNLIMITED/MaxTime=12:00:00/\n")
    wrappers.switch("srun.sed", "/pmix/d\n")
    result = aimass("site", "check", str(path), "--live", env=wrappers.env())
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    for key, text in [
        ("partitions.debug.gpus_per_node", "config says 8"),
        ("partitions.gpu", "no partition 'gpu'"),
        ("partitions.debug.max_time", "config says 2-00:00:00, partition debug's MaxTime is"),
        ("partitions.debug.default_time", "config says 1-00:00:00, above"),
        ("account", "'no-such-account'"),
        ("serving.default_reservation", "no reservation 'no-such-reservation'"),
        ("mpi.srun_mpi", "config says 'pmix', srun --mpi=list offers"),
    ]:
        assert any(line.startswith(f"{path}: {key}: ") and text in line for line in lines), (
            key,
            result.stdout,
        )
    assert len(lines) == 7 and "7 problem(s)" in result.stderr


def test_a_silent_scheduler_is_skipped_by_default_and_fatal_with_live(wrappers: Wrappers):
    wrappers.switch("down")
    result = aimass("site", "check", "dev", env=wrappers.env())
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if "live checks skipped" in line]
    assert len(skipped) == 1 and "Unable to contact slurm controller" in skipped[0]
    assert "matches the cluster" not in result.stdout and ": ok (" in result.stdout

    result = aimass("site", "check", "dev", "--live", env=wrappers.env())
    assert result.returncode == 5
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "live checks failed" in result.stderr and "Unable to contact" in result.stderr

    # --json keeps stdout a JSON list; the note goes to stderr.
    result = aimass("site", "check", "dev", "--json", env=wrappers.env())
    assert result.returncode == 0 and json.loads(result.stdout) == []
    assert "live checks skipped" in result.stderr

    result = aimass("site", "check", "dev", "--no-live", env=wrappers.env())
    assert result.returncode == 0 and "live" not in result.stdout


def test_a_hung_scheduler_is_skipped_after_a_short_wait(wrappers: Wrappers):
    wrappers.switch("hung")
    result = aimass("site", "check", "dev", env=wrappers.env())
    assert result.returncode == 0, result.stderr
    assert "live checks skipped: scontrol did not answer within 5s" in result.stdout


def test_a_config_for_another_cluster_is_not_compared_unless_asked(cluster):
    result = aimass("site", "check", "example-hpc")
    assert result.returncode == 0, result.stderr
    assert "live checks skipped: the cluster here has none of the site's partitions" in (
        result.stdout
    )
    result = aimass("site", "check", "example-hpc", "--live", "--json")
    assert result.returncode == 2
    paths = {p["path"] for p in json.loads(result.stdout)}
    assert {"partitions.h100", "partitions.a100", "account"} <= paths
