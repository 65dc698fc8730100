"""Site sbatch/srun options and per-partition env/defaults on the real local Slurm cluster:
sbatch and srun accept what the site adds, and the ranks see the partition's environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _sitefixtures import site_data, write_site

pytestmark = pytest.mark.cluster


def test_site_options_and_partition_env_reach_a_real_job(cluster, tmp_path):
    part = site_data("dev")["partitions"]["debug"]
    part.update(default_cpus_per_task=2, env={"PART_VAR": "from the partition"})
    site = write_site(
        tmp_path,
        "dev",
        partitions={"debug": part},
        sbatch_options=["--comment=aimass-site-keys"],
        srun_options=["--cpu-bind=none"],
    )
    spec = tmp_path / "job.toml"
    spec.write_text(
        '[job]\nname = "keys"\nnodes = 1\nntasks_per_node = 2\n'
        'command = ["bash", "-c", '
        '"echo rank=$SLURM_PROCID part=$PART_VAR cpus=$SLURM_CPUS_PER_TASK"]\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "submit", "--site", str(site.source), str(spec),
         "--wait", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"]["state"] == "COMPLETED"
    logs = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "logs", "--site", str(site.source), result["job_id"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = sorted(ln for ln in logs.stdout.splitlines() if ln.startswith("rank="))
    assert lines == [
        "rank=0 part=from the partition cpus=2",
        "rank=1 part=from the partition cpus=2",
    ]
