"""A supervised vLLM service heals on the real local Slurm cluster (issue 14).

Specification: `aimass serve start NAME:1 --engine vllm --min-replicas 1 --max-replicas 2`
(autoscaling implies `--supervise`) starts one vLLM replica (CPU build from `.venv-vllm`) and
a supervisor that checks it with a real one-token completion and reads vLLM's request gauges
for scaling (idle: it stays at one replica). When the replica's job is cancelled (scancel), the
supervisor replaces it: a new job for the same replica index becomes READY and answers the
`openai` client with the service token; `aimass serve status NAME` shows the replacement with
its reason; `aimass endpoints` shows the engine. The test prints the time to detect and to
replace the failed replica. Cheap on purpose: at most one live vLLM replica at a time (each
takes ~2 GiB and about a minute to start here), and the service is always stopped.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from _llmfixtures import aimass, tiny_in_repo

from aimass_hpc.launch.serving import read_decisions
from aimass_hpc.serve.auth import read_token
from aimass_hpc.serve.endpoints import EndpointRecord, read_records

pytestmark = pytest.mark.cluster


def _ready(run_dir: Path, replica: int) -> EndpointRecord | None:
    for rec in read_records(run_dir):
        if rec.replica == replica and rec.state == "READY":
            return rec
    return None


def _complete(rec: EndpointRecord) -> str:
    from openai import OpenAI

    client = OpenAI(
        base_url=f"{rec.url}/v1", api_key=read_token(str(rec.token_file)), max_retries=0,
        timeout=120,
    )  # fmt: skip
    done = client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
    assert done.usage is not None and done.usage.completion_tokens >= 1
    return str(done.choices[0].finish_reason)


def test_supervisor_replaces_a_cancelled_vllm_replica(cluster, tmp_path: Path) -> None:
    site = tiny_in_repo(tmp_path)
    sf = str(site.source)

    out = aimass("serve", "start", "tiny:1", "--engine", "vllm", "--site", sf, "--cpus", "2",
                 "--min-replicas", "1", "--max-replicas", "2", "--check-interval", "1",
                 "--wait", "--timeout", "600", "--json")  # fmt: skip
    started = json.loads(out.stdout)
    run_dir = Path(started["run_dir"])
    try:
        assert started["supervisor_job_id"] and started["replicas"] == 1
        victim = _ready(run_dir, 0)
        assert victim is not None and victim.engine == "vllm"
        assert _complete(victim) in ("length", "stop")
        time.sleep(3)  # a few supervisor rounds: a healthy vLLM replica passes its checks
        assert not [d for d in read_decisions(run_dir) if d["action"] == "check-failed"]

        t_kill = time.monotonic()
        subprocess.run(["scancel", victim.job_id], check=True)
        detect_s = replace_s = None
        new: EndpointRecord | None = None
        deadline = t_kill + 420
        while time.monotonic() < deadline:
            if detect_s is None and any(
                d["action"] in ("fence", "replace") and victim.job_id in json.dumps(d)
                for d in read_decisions(run_dir)
            ):
                detect_s = time.monotonic() - t_kill
            new = _ready(run_dir, 0)
            if new is not None and new.job_id != victim.job_id:
                replace_s = time.monotonic() - t_kill
                break
            time.sleep(0.5)
        assert new is not None and replace_s is not None, read_records(run_dir)
        print(f"\nvLLM replica scancelled: replacement decided after {detect_s:.1f} s, "
              f"new replica READY after {replace_s:.1f} s")  # fmt: skip
        assert new.engine == "vllm" and new.history[0]["why"] == "submitted by the supervisor"
        old = next(r for r in read_records(run_dir) if r.key == victim.key)
        assert old.state in ("FAILED", "STOPPED"), old
        assert _complete(new) in ("length", "stop")

        (doc,) = json.loads(aimass("serve", "status", "tiny", "--site", sf, "--json").stdout)
        assert doc["desired_replicas"] == 1 and doc["ready_replicas"] == 1
        assert doc["supervisor"]["replaced"] == 1
        replace = [d for d in doc["decisions"] if d["action"] == "replace"]
        assert replace and replace[-1]["old_job_id"] == victim.job_id
        assert replace[-1]["why"].startswith("replica 0 has no live job")
        assert not [d for d in doc["decisions"] if d["action"].startswith("scale-")]
        text = aimass("serve", "status", "tiny", "--site", sf).stdout
        assert "replace" in text and "replica 0 has no live job" in text

        rows = json.loads(aimass("endpoints", "tiny", "--site", sf, "--json").stdout)
        assert [(r["engine"], r["state"], r["health"]) for r in rows] == [
            ("vllm", "READY", "ready")
        ]
    finally:
        aimass("serve", "stop", str(run_dir), "--site", sf, check=False)
    assert not any(r.state == "READY" for r in read_records(run_dir))
