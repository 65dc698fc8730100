"""A vLLM service scales with its load on the real local Slurm cluster (issue 14).

Specification: `aimass serve start NAME:1 --engine vllm --min-replicas 1 --max-replicas 2`
starts one vLLM replica and a supervisor that reads vLLM's own request gauges
(``vllm:num_requests_running`` + ``vllm:num_requests_waiting``) on every READY replica. Under
a load of several concurrent streaming completions (more ongoing requests than
``--target-ongoing`` per replica for longer than ``--upscale-delay``) it adds a replica, which
becomes READY and is reached by the ``openai`` client built by
:func:`aimass_hpc.serve.llm.openai_client`; once the load stops (slack for longer than
``--downscale-delay``) it goes back to one replica and the extra one stops. No request fails.
The test prints the times of the decisions and of the new replica's READY.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from _llmfixtures import aimass, tiny_in_repo

from aimass_hpc.launch.serving import read_decisions
from aimass_hpc.serve.endpoints import read_records
from aimass_hpc.serve.llm import ENDPOINT_HEADER, openai_client

pytestmark = pytest.mark.cluster

STREAMS = 6  # concurrent streaming requests: 6 ongoing on one replica, target 2 -> wants 3


class StreamingLoad:
    """``STREAMS`` threads, each streaming completions back to back; keeps failures."""

    def __init__(self, runs_root: Path) -> None:
        self.client = openai_client(
            "tiny:1", runs_root=runs_root, refresh_interval=1.0, timeout=120
        )
        self.done = 0
        self.failures: list[str] = []
        self.urls: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(STREAMS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.client.completions.with_raw_response.create(
                    model="tiny", prompt="Once upon a time", max_tokens=48, stream=True
                )
                chunks = list(raw.parse())
                assert any(c.choices for c in chunks), chunks
                with self._lock:
                    self.done += 1
                    self.urls.add(raw.headers.get(ENDPOINT_HEADER, "?"))
            except Exception as exc:
                with self._lock:
                    self.failures.append(repr(exc)[:300])

    def __enter__(self) -> StreamingLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)
        self.client.close()


def _decision(run_dir: Path, action: str) -> dict | None:
    found = [d for d in read_decisions(run_dir) if d["action"] == action]
    return found[-1] if found else None


def _ready(run_dir: Path) -> dict[int, str]:
    return {r.replica: r.job_id for r in read_records(run_dir) if r.state == "READY"}


def test_a_vllm_service_scales_up_under_load_and_back_down(cluster, tmp_path: Path) -> None:
    site = tiny_in_repo(tmp_path)
    sf = str(site.source)

    out = aimass("serve", "start", "tiny:1", "--engine", "vllm", "--site", sf, "--cpus", "2",
                 "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing", "2",
                 "--upscale-delay", "2", "--downscale-delay", "5", "--check-interval", "1",
                 "--wait", "--timeout", "600", "--json")  # fmt: skip
    started = json.loads(out.stdout)
    run_dir = Path(started["run_dir"])
    try:
        assert started["replicas"] == 1 and list(_ready(run_dir)) == [0]
        t0 = time.monotonic()
        with StreamingLoad(site.runs_root) as load:
            up_s = ready_s = None
            deadline = t0 + 480
            while time.monotonic() < deadline:
                up = _decision(run_dir, "scale-up")
                if up_s is None and up is not None:
                    up_s = time.monotonic() - t0
                if up is not None and 1 in _ready(run_dir):
                    ready_s = time.monotonic() - t0
                    break
                assert not load.failures, load.failures[:3]
                time.sleep(0.5)
            assert up is not None and ready_s is not None, read_decisions(run_dir)[-5:]
            assert up["to"] == 2 and "ongoing requests" in up["why"], up
            # The client's record refresh finds the new replica and sends it requests.
            new_url = next(r.url for r in read_records(run_dir) if r.replica == 1)
            until = time.monotonic() + 60
            while new_url not in load.urls and time.monotonic() < until:
                time.sleep(0.5)
            served_by = set(load.urls)
        assert not load.failures, load.failures[:3]
        assert new_url in served_by, (new_url, served_by)
        print(
            f"\nvLLM scale-up: decided after {up_s:.1f} s of load ({up['why']}), second "
            f"replica READY after {ready_s:.1f} s; {load.done} streams, 0 failed"
        )

        t_idle = time.monotonic()
        down_s = None
        deadline = t_idle + 180
        while time.monotonic() < deadline:
            if _decision(run_dir, "scale-down") is not None and list(_ready(run_dir)) == [0]:
                down_s = time.monotonic() - t_idle
                break
            time.sleep(0.5)
        down = _decision(run_dir, "scale-down")
        assert down is not None and down_s is not None, read_decisions(run_dir)[-5:]
        assert down["to"] == 1, down
        print(f"vLLM scale-down: back to 1 READY replica {down_s:.1f} s after the load stopped")

        (doc,) = json.loads(aimass("serve", "status", "tiny", "--site", sf, "--json").stdout)
        assert doc["desired_replicas"] == 1 and doc["ready_replicas"] == 1
        actions = [d["action"] for d in doc["decisions"]]
        assert "scale-up" in actions and "scale-down" in actions
    finally:
        aimass("serve", "stop", str(run_dir), "--site", sf, check=False)
    assert not any(r.state == "READY" for r in read_records(run_dir))
