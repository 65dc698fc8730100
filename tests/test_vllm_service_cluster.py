"""An LLM service under load on the real local Slurm cluster (issue 14, "Tests and benchmarks").

Two vLLM replicas of a tiny random-weight Llama (``tiny@prod`` -> version 1) answer the
``openai`` client built by :func:`aimass_hpc.serve.llm.openai_client` (completions, streaming,
chat). While a thread keeps sending requests through that client,

(a) ``aimass serve upgrade tiny@prod`` switches blue/green to version 2 (the same tiny model
    built with another seed, imported again), after which every answer comes from version 2;
(b) one replica gets Slurm's time-limit warning (the site's signal, sent to its job steps as
    Slurm does at ``--signal=USR1@grace``) and hands over to a replacement job;

and no request fails (the transport moves a request to another replica on a connection error
or a 503 before any byte of the answer). At most four vLLM replicas run at once (~2.1 GiB each).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from _llmfixtures import aimass, build_tiny, llm_site
from _sitefixtures import site_data

from aimass_hpc.serve.endpoints import EndpointState, find_records
from aimass_hpc.serve.llm import openai_client

pytestmark = pytest.mark.cluster

# The warning's lead: room for a replacement vLLM to start (45-85 s idle, minutes when the
# 2-core machine is busy); the replica drains once the replacement is READY, not at this time.
GRACE_S = 420


class Load:
    """A thread asking the service through ``openai_client``; keeps versions and failures."""

    def __init__(self, runs_root: Path) -> None:
        self.client = openai_client(
            "tiny@prod", runs_root=runs_root, refresh_interval=1.0, timeout=120
        )
        self.answers: list[tuple[float, str | None]] = []  # (start time, version)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            n += 1
            try:
                if n % 2:
                    raw = self.client.completions.with_raw_response.create(
                        model="tiny", prompt="Hello", max_tokens=4
                    )
                    assert raw.parse().choices[0].text is not None
                else:
                    stream = self.client.completions.with_raw_response.create(
                        model="tiny", prompt="Once upon", max_tokens=4, stream=True
                    )
                    chunks = list(stream.parse())
                    assert any(c.choices for c in chunks), chunks
                    raw = stream
                self.answers.append((t0, raw.headers.get("x-aimass-version")))
            except Exception as exc:
                self.failures.append(repr(exc)[:300])
            time.sleep(0.3)  # steady, light load: the CPU build pins every engine to core 0

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(180)
        self.client.close()

    def versions_since(self, t: float) -> set[str | None]:
        return {v for when, v in self.answers if when >= t}

    def wait_for_answers(self, n: int = 5, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.answers)
        while len(self.answers) < start + n:
            assert time.monotonic() < deadline, self.failures[:3]
            time.sleep(0.2)


def test_llm_service_upgrade_and_handover_under_load(cluster, tmp_path: Path) -> None:
    preemption = {**site_data("dev")["preemption"], "grace_seconds": GRACE_S}
    site = llm_site(tmp_path, preemption=preemption)
    site_file = str(site.source)
    for seed in (0, 1):  # tiny:1 and tiny:2
        build_tiny(tmp_path / f"tiny-{seed}", seed)
        aimass("models", "--site", site_file, "import-hf", str(tmp_path / f"tiny-{seed}"), "tiny")
    aimass("models", "--site", site_file, "promote", "tiny:1", "prod")
    try:
        out = aimass("serve", "start", "tiny@prod", "--engine", "vllm", "--site", site_file,
                     "--replicas", "2", "--cpus", "2", "--time", "30", "--wait",
                     "--timeout", "600", "--json")  # fmt: skip
        assert len(json.loads(out.stdout)["endpoints"]) == 2
        client = openai_client("tiny@prod", site=site_file, timeout=120)
        done = client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        assert (
            done.usage is not None
            and done.usage.completion_tokens == 8
            or (done.choices[0].finish_reason == "stop")
        )
        chunks = list(client.completions.create(
            model="tiny", prompt="The quick brown", max_tokens=8, stream=True))  # fmt: skip
        assert len(chunks) >= 2 and any(c.choices and c.choices[0].text for c in chunks)
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
        assert chat.choices[0].message.role == "assistant"
        seen = {client.completions.with_raw_response.create(model="tiny", prompt="a",
                max_tokens=1).headers["x-aimass-endpoint"] for _ in range(4)}  # fmt: skip
        assert len(seen) == 2  # both replicas answer
        client.close()

        with Load(site.runs_root) as load:
            load.wait_for_answers()
            # (a) blue/green upgrade to version 2
            aimass("models", "--site", site_file, "promote", "tiny:2", "prod")
            up = json.loads(aimass("serve", "upgrade", "tiny@prod", "--site", site_file,
                                   "--json").stdout)  # fmt: skip
            assert up["old_versions"] == ["1"] and up["new_version"] == "2"
            t_new = time.monotonic()
            load.wait_for_answers()
            # (b) the time-limit warning for replica 0 of the new job: it hands over
            live = [r for r in find_records(site.runs_root, "tiny@prod")
                    if r.state == EndpointState.READY]  # fmt: skip
            assert {r.version for r in live} == {"2"} and len(live) == 2
            first = min(live, key=lambda r: r.replica)
            t_warn = time.monotonic()
            sig = subprocess.run(["scancel", "--signal=USR1", first.job_id],
                                 capture_output=True, text=True)  # fmt: skip
            assert sig.returncode == 0, sig.stderr
            deadline = time.monotonic() + GRACE_S + 60
            while True:
                records = find_records(site.runs_root, "tiny@prod")
                old = [r for r in records if r.job_id == first.job_id]
                new = [r for r in records if r.state == EndpointState.READY
                       and r.replica == first.replica and r.job_id != first.job_id]  # fmt: skip
                if old and old[0].state == EndpointState.STOPPED and new:
                    break
                assert time.monotonic() < deadline, [(r.job_id, r.state) for r in records]
                time.sleep(1)
            handover_s = time.monotonic() - t_warn
            load.wait_for_answers()
        print(f"\nLLM service under load: {len(load.answers)} answers, "
              f"{len(load.failures)} failed; handover {handover_s:.0f} s")  # fmt: skip
        assert load.failures == []
        assert load.versions_since(t_new) == {"2"}
        assert {v for when, v in load.answers if when < t_new} >= {"1"}
        assert old[0].message == f"handing over to {new[0].job_id}"
        assert new[0].version == "2"
        # a handover, not a gap: the old replica drained only once its replacement was READY
        ready_at = max(h["at"] for h in new[0].history if h["state"] == "READY")
        drained_at = min(h["at"] for h in old[0].history if h["state"] == "DRAINING")
        assert ready_at <= drained_at
    finally:
        aimass("serve", "stop", "tiny", "--site", site_file, check=False)
