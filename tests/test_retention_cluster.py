"""Retention and model cost on the local Slurm cluster, through ``aimass train`` as a user runs it.

A digits run checkpoints after every one of its 10 steps with ``keep_checkpoints = 2``: what is
left is the 2 newest checkpoints and the final model, and the final model carries its FLOPs per
sample, peak memory and type, so ``aimass models search`` finds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import write_site

from aimass_hpc.launch.scheduler import get_scheduler
from aimass_hpc.repo import ModelRepository

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

SPEC = f"""
name = "keep-two"
pythonpath = [{json.dumps(str(DIGITS))}]
[task]
ref = "digits_mlp:build"
args = {{ hidden = 64, dropout = 0.0 }}
[train]
lr = 0.1
batch_size = 64
steps = 10
checkpoint_every = 1
keep_checkpoints = 2
[model]
name = "keep-two"
[job]
nodes = 1
tasks_per_node = 1
cpus_per_task = 1
time = "00:05:00"
"""


def aimass(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True, timeout=120
    )


def test_training_keeps_two_checkpoints_and_a_searchable_final(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    site = write_site(tmp_path, "dev")
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out = aimass("train", str(spec), "--site", site.source or "", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    run_dir = Path(job["run_dir"])
    state = get_scheduler(site).wait([job["job_id"]], timeout=300, poll=2.0)[job["job_id"]]
    logs = "\n".join(p.read_text(errors="replace") for p in (run_dir / "logs").iterdir())
    assert state.state.value == "COMPLETED", logs
    final_ref = json.loads((run_dir / "result.json").read_text())["final_ref"]

    repo = ModelRepository(site.models_root)
    versions = repo.versions("keep-two")
    assert [v.kind for v in versions] == ["checkpoint", "checkpoint", "model"], logs
    assert [v.metadata["run"]["step"] for v in versions[:2]] == [9, 10]
    final = versions[-1]
    assert final.ref == final_ref
    assert final.flops_per_sample == 2 * (64 * 64 + 64 * 10)  # the digits MLP, one sample
    assert final.peak_memory_bytes and final.peak_memory_bytes < 1 << 20
    assert final.model_type == "classifier"
    pruned = [json.loads(x) for x in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert len([e for e in pruned if e["kind"] == "pruned"]) == 8

    found = aimass(
        "models", "--repo", str(site.models_root), "search", "--type", "classifier",
        "--flops", "1K..10M", "--memory", "..64M", "--json",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert [v["ref"] for v in json.loads(found.stdout)] == [final_ref]
    listed = aimass("models", "--repo", str(site.models_root), "ls", "keep-two")
    assert listed.returncode == 0 and "2 checkpoint(s), newest keep-two:" in listed.stdout
