"""Serving on the real local Slurm cluster, through the ``aimass`` CLI.

Specification (issue 6, "Tests on the local cluster"):
- a model from the repository is served in a reservation, discovered, and its predictions
  equal a local forward pass;
- upgrade to a new version and roll back while a client sends requests continuously: no
  request fails, and the answers change to the new model's and back;
- a serve job with a short time limit is replaced before it ends, with no failed request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve import Client, toymodels
from aimass_hpc.serve.endpoints import EndpointState, find_records

pytestmark = pytest.mark.cluster

KWARGS = {"in_features": 6, "hidden": 16, "out_features": 3}
X = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)


def aimass(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"aimass {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


class Setup:
    """A dev-cluster site under tmp_path and a repository holding toy:1 and toy:2."""

    def __init__(self, tmp: Path) -> None:
        self.site = write_site(tmp, "dev")
        self.site_file = str(self.site.source)
        self.runs = self.site.runs_root
        repo = ModelRepository(self.site.models_root)
        self.nets: dict[str, torch.nn.Module] = {}
        for seed in (1, 2):
            torch.manual_seed(seed)
            net = toymodels.mlp(**KWARGS).eval()
            v = repo.save("toy", net.state_dict(), recipe=toymodels.recipe(**KWARGS))
            self.nets[str(v.number)] = net
        repo.promote("toy", 1, "prod")

    def local(self, version: str) -> np.ndarray:
        with torch.inference_mode():
            return self.nets[version](torch.from_numpy(X)).numpy()

    def stop_all(self) -> None:
        aimass("serve", "stop", "toy", "--site", self.site_file, check=False)


@pytest.fixture
def setup(cluster, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


class Load:
    """A client thread predicting continuously; remembers versions seen and every failure."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.failures: list[str] = []
        self.answers: list[tuple[float, str | None, np.ndarray]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client("toy@prod", runs_root=self.setup.runs, refresh_interval=1.0) as client:
            while not self._stop.is_set():
                try:
                    pred = client.predict_full(X)
                    self.answers.append((time.monotonic(), pred.version, pred.outputs))
                except Exception as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def versions_since(self, t: float) -> set[str | None]:
        return {v for when, v, _ in self.answers if when >= t}

    def wait_for_answers(self, n: int = 20, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.answers)
        while len(self.answers) < start + n:
            assert time.monotonic() < deadline, self.failures[:3]
            time.sleep(0.1)


def test_serve_in_a_reservation_discover_and_predict(setup: Setup) -> None:
    resv = f"aimass-serve-{int(time.time())}"
    aimass("reserve", "create", resv, "--nodes", "node3", "--duration", "20",
           "--flags", "ignore_jobs")  # fmt: skip
    try:
        listed = json.loads(aimass("reserve", "list", "--json").stdout)
        assert resv in [r["ReservationName"] for r in listed]
        out = aimass("serve", "toy@prod", "--site", setup.site_file, "--replicas", "2",
                     "--reservation", resv, "--wait", "--timeout", "180", "--json")  # fmt: skip
        job_id = json.loads(out.stdout)["job_id"]
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                               text=True).stdout  # fmt: skip
        assert f"Reservation={resv}" in shown and "NodeList=node3" in shown
        rows = json.loads(aimass("endpoints", "toy@prod", "--site", setup.site_file,
                                 "--json").stdout)  # fmt: skip
        assert sorted(r["replica"] for r in rows) == [0, 1]
        assert {(r["state"], r["health"], r["version"], r["node"]) for r in rows} == {
            ("READY", "ready", "1", "node3")
        }
        with Client("toy@prod", runs_root=setup.runs) as client:
            used = set()
            for _ in range(4):
                pred = client.predict_full(X)
                np.testing.assert_allclose(pred.outputs, setup.local("1"), rtol=1e-5, atol=1e-6)
                used.add(pred.endpoint)
            assert len(used) == 2  # both replicas answer
        bench = aimass("bench", "toy@prod", "--site", setup.site_file, "--batch", "4",
                       "--duration", "1", "--concurrency", "8", "--json")  # fmt: skip
        bench = json.loads(bench.stdout)
        assert bench["requests_failed"] == 0 and bench["requests_ok"] > 0
        assert bench["input_shape"] == [4, 6] and bench["output_shape"] == [4, 3]
        aimass("serve", "stop", "toy@prod", "--site", setup.site_file)
        states = {r.state for r in find_records(setup.runs, "toy@prod")}
        assert states == {EndpointState.STOPPED}
    finally:
        aimass("reserve", "delete", resv, check=False)


def test_upgrade_and_rollback_under_load(setup: Setup) -> None:
    aimass("serve", "toy@prod", "--site", setup.site_file, "--replicas", "2", "--wait",
           "--timeout", "180")  # fmt: skip
    with Load(setup) as load:
        load.wait_for_answers()
        aimass("models", "--site", setup.site_file, "promote", "toy:2", "prod")
        up = json.loads(aimass("serve", "upgrade", "toy@prod", "--site", setup.site_file,
                               "--json").stdout)  # fmt: skip
        assert up["old_versions"] == ["1"] and up["new_version"] == "2"
        t_new = time.monotonic()
        load.wait_for_answers()
        aimass("models", "--site", setup.site_file, "rollback", "toy@prod")
        back = json.loads(aimass("serve", "upgrade", "toy@prod", "--site", setup.site_file,
                                 "--json").stdout)  # fmt: skip
        assert back["old_versions"] == ["2"] and back["new_version"] == "1"
        t_back = time.monotonic()
        load.wait_for_answers()
    assert load.failures == []
    assert load.versions_since(t_new) - load.versions_since(t_back) >= {"2"}
    assert load.versions_since(t_back) == {"1"}
    for _, version, outputs in load.answers:  # every answer is exactly its version's model
        np.testing.assert_allclose(outputs, setup.local(version), rtol=1e-5, atol=1e-6)


def test_time_limit_handover_loses_no_request(setup: Setup) -> None:
    out = aimass("serve", "toy@prod", "--site", setup.site_file, "--time", "2", "--wait",
                 "--timeout", "180", "--json")  # fmt: skip
    first = json.loads(out.stdout)["job_id"] + "_0"
    with Load(setup) as load:
        deadline = time.monotonic() + 240  # 2 min limit; warning 30-90 s before it
        while True:
            records = find_records(setup.runs, "toy@prod")
            old = [r for r in records if r.job_id == first]
            new = [r for r in records if r.job_id != first and r.state == EndpointState.READY]
            if old and old[0].state == EndpointState.STOPPED and new:
                break
            assert time.monotonic() < deadline, [(r.job_id, r.state) for r in records]
            time.sleep(1)
        load.wait_for_answers()
    assert load.failures == []
    assert old[0].message == f"handing over to {new[0].job_id}"
    assert new[0].version == "1"
