"""Discovery and the client helper against real replicas (local subprocesses, real HTTP).

Specification:
- ``Client("NAME@ALIAS", runs_root=...)`` finds the READY replicas through their endpoint
  records, reads each one's token, and spreads requests round robin;
- a replica that crashes (SIGKILL) or drains (SIGTERM) under continuous load costs the
  caller no failed request: the request moves to another replica;
- 4xx answers are raised at once with the server's message; unknown models are NotFound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from aimass_hpc.common.errors import NotFoundError
from aimass_hpc.serve import AsyncClient, Client, toymodels
from aimass_hpc.serve.client import RequestRejected, ServiceUnavailable
from aimass_hpc.serve.endpoints import EndpointState
from aimass_hpc.serve.local import LocalReplica

KWARGS = {"in_features": 6, "hidden": 16, "out_features": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(7)
    model = toymodels.mlp(**KWARGS).eval()
    path = tmp_path_factory.mktemp("client-weights") / "w.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _replica(root: Path, i: int, weights: Path, ref: str = "toy@prod", **kw) -> LocalReplica:
    return LocalReplica(
        root / f"run{i}",
        recipe=toymodels.recipe(**KWARGS),
        weights=weights,
        model=ref,
        version=kw.pop("version", "1"),
        extra_args=["--drain-grace-s", "1.0"],
        **kw,
    )


@pytest.fixture
def pair(tmp_path: Path, weights) -> Iterator[tuple[Path, list[LocalReplica]]]:
    reps = [_replica(tmp_path, i, weights[0]) for i in range(2)]
    try:
        for r in reps:
            r.wait_ready()
        yield tmp_path, reps
    finally:
        for r in reps:
            r.signal(15)  # drain both at once
        for r in reps:
            r.stop()


def _local(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x.astype(np.float32))).numpy()


def test_client_resolves_alias_and_spreads_requests(pair, weights) -> None:
    root, reps = pair
    model = weights[1]
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with Client("toy@prod", runs_root=root) as client:
        assert {e.url for e in client.endpoints()} == {r.url for r in reps}
        used = set()
        for _ in range(6):
            pred = client.predict_full(x)
            np.testing.assert_allclose(pred.outputs, _local(model, x), rtol=1e-5, atol=1e-6)
            assert (pred.model, pred.version) == ("toy", "1")
            used.add(pred.endpoint)
        assert used == {r.url for r in reps}  # round robin over both
        big = np.random.default_rng(1).standard_normal((64, 6))
        y = client.predict(big, binary=True)
        np.testing.assert_allclose(y, _local(model, big), rtol=1e-5, atol=1e-6)
        (info,) = client.models()
        assert info["input_shape"] == [6]
    for target in ("toy", "toy:1"):
        with Client(target, runs_root=root) as client:
            assert len(client.endpoints()) == 2


def test_client_raises_4xx_at_once(pair) -> None:
    root, _ = pair
    with Client("toy@prod", runs_root=root) as client:
        with pytest.raises(RequestRejected, match="expected") as info:
            client.predict(np.zeros((1, 5)))
        assert info.value.status == 422 and client.retries == 0


def test_url_target_needs_the_token(pair) -> None:
    _, reps = pair
    url = reps[0].url
    with Client(url, token=reps[0].token) as client:
        assert client.predict(np.zeros((1, 6))).shape == (1, 2)
    with Client(url, token="wrong") as client, pytest.raises(RequestRejected) as info:
        client.predict(np.zeros((1, 6)))
    assert info.value.status == 401


def test_unknown_model_is_not_found(tmp_path: Path) -> None:
    with Client("nope@prod", runs_root=tmp_path) as client, pytest.raises(NotFoundError):
        client.predict(np.zeros((1, 6)))


def _load(client: Client, stop: threading.Event, failures: list, counts: dict) -> None:
    x = np.ones((2, 6), np.float32)
    while not stop.is_set():
        try:
            pred = client.predict_full(x)
            counts[pred.endpoint] = counts.get(pred.endpoint, 0) + 1
        except Exception as exc:  # any failure is a test failure, recorded for the report
            failures.append(repr(exc))


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_losing_a_replica_under_load_fails_no_request(pair, how: str) -> None:
    root, reps = pair
    stop, failures, counts = threading.Event(), [], {}
    with Client("toy@prod", runs_root=root, refresh_interval=0.5) as client:
        client.refresh()
        worker = threading.Thread(target=_load, args=(client, stop, failures, counts))
        worker.start()
        try:
            time.sleep(1.0)
            if how == "sigkill":
                reps[0].kill()  # its record still says READY: the client must cope
            else:
                reps[0].signal(15)
                reps[0].wait_state(EndpointState.STOPPED, timeout=30)
            before = counts.get(reps[1].url, 0)
            time.sleep(1.5)
        finally:
            stop.set()
            worker.join(30)
    assert failures == []
    assert counts.get(reps[1].url, 0) > before  # the survivor took over


def test_no_live_replica_is_unavailable_after_the_retry_timeout(tmp_path: Path, weights) -> None:
    rep = _replica(tmp_path, 0, weights[0])
    rep.wait_ready()
    rep.kill()
    client = Client("toy@prod", runs_root=tmp_path, retry_timeout=1.0)
    with client, pytest.raises(ServiceUnavailable, match="toy@prod"):
        client.predict(np.zeros((1, 6)))


def test_async_client(pair, weights) -> None:
    root, _ = pair
    x = np.random.default_rng(3).standard_normal((3, 6)).astype(np.float32)

    async def go() -> list[np.ndarray]:
        async with AsyncClient("toy@prod", runs_root=root) as client:
            return await asyncio.gather(*(client.predict(x) for _ in range(8)))

    for y in asyncio.run(go()):
        np.testing.assert_allclose(y, _local(weights[1], x), rtol=1e-5, atol=1e-6)
