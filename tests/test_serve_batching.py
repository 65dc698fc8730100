"""The dynamic batcher on its own: real threads, a real event loop, a numpy "model".

Specification: requests that arrive together share forward passes (never more rows than
``max_batch_size``, never a request split across two), every caller gets exactly its own
rows back, one failing request does not fail its neighbours, and stop() finishes the queue.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from aimass_hpc.serve.batching import BatcherStopped, DynamicBatcher, QueueFull


class Recorder:
    """A model that doubles its input and records the batch sizes it saw."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.gate = gate

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(10)
        if (x < 0).any():
            raise ValueError("negative input")
        self.batches.append(len(x))
        return x * 2


async def _submit_all(batcher: DynamicBatcher, xs: list[np.ndarray]) -> list:
    return await asyncio.gather(*(batcher.submit(x) for x in xs), return_exceptions=True)


def test_concurrent_requests_share_forwards_and_get_their_own_rows() -> None:
    gate = threading.Event()
    model = Recorder(gate)
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_ms=50).start()
    xs = [np.full((1 + i % 3, 2), float(i)) for i in range(20)]

    async def go() -> list:
        task = asyncio.ensure_future(_submit_all(batcher, xs))
        await asyncio.sleep(0.2)  # everything queued while the first forward is held
        gate.set()
        return await task

    try:
        outs = asyncio.run(go())
    finally:
        batcher.stop()
    for x, y in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(model.batches) == sum(len(x) for x in xs)
    assert max(model.batches) <= 8
    assert len(model.batches) <= 8  # 39 rows in batches of up to 8 (+ the first, held one)


def test_without_batching_every_request_is_forwarded_alone() -> None:
    model = Recorder()
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_ms=50, batching=False).start()
    try:
        asyncio.run(_submit_all(batcher, [np.ones((2, 2))] * 6))
    finally:
        batcher.stop()
    assert model.batches == [2] * 6


def test_a_failing_request_does_not_fail_its_batch() -> None:
    gate = threading.Event()
    model = Recorder(gate)
    batcher = DynamicBatcher(model, max_batch_size=16, max_wait_ms=50).start()
    xs = [np.ones((1, 2)), -np.ones((1, 2)), np.ones((1, 2)) * 3]

    async def go() -> list:
        task = asyncio.ensure_future(_submit_all(batcher, xs))
        await asyncio.sleep(0.1)
        gate.set()
        return await task

    try:
        outs = asyncio.run(go())
    finally:
        batcher.stop()
    np.testing.assert_array_equal(outs[0], [[2, 2]])
    assert isinstance(outs[1], ValueError)
    np.testing.assert_array_equal(outs[2], [[6, 6]])


def test_queue_limit_and_stop() -> None:
    gate = threading.Event()
    batcher = DynamicBatcher(Recorder(gate), max_batch_size=1, max_queue=2).start()

    async def go() -> list:
        tasks = [asyncio.ensure_future(batcher.submit(np.ones((1, 1))))]
        while batcher.pending == 0 or batcher._queue:  # the first one is in the forward
            await asyncio.sleep(0.01)
        # two more fill the queue, the fourth is refused
        tasks += [asyncio.ensure_future(batcher.submit(np.ones((1, 1)))) for _ in range(3)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outs = asyncio.run(go())
    assert sum(isinstance(o, QueueFull) for o in outs) == 1
    assert sum(isinstance(o, np.ndarray) for o in outs) == 3
    batcher.stop()
    with pytest.raises(BatcherStopped):
        asyncio.run(batcher.submit(np.ones((1, 1))))


def test_observer_sees_every_forward() -> None:
    seen: list[tuple[int, int]] = []
    batcher = DynamicBatcher(
        lambda x: x, max_batch_size=4, observer=lambda r, n, f, w: seen.append((r, n))
    ).start()
    try:
        asyncio.run(_submit_all(batcher, [np.ones((2, 1))] * 3))
    finally:
        batcher.stop()
    assert sum(r for r, _ in seen) == 6 and sum(n for _, n in seen) == 3
    assert all(r <= 4 for r, _ in seen)


def test_two_workers_form_the_next_batch_while_one_forwards() -> None:
    # With a model process, batch N+1 waits in its pipe while batch N runs.
    started: list[str] = []
    both_in = threading.Barrier(2, timeout=10)

    def forward(x: np.ndarray) -> np.ndarray:
        started.append(threading.current_thread().name)
        if len(started) <= 2:
            both_in.wait()  # the first two batches are in flight at the same time
        return x + 1

    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_ms=0, workers=2).start()
    xs = [np.full((2, 3), i, np.float32) for i in range(12)]
    try:
        outs = asyncio.run(_submit_all(batcher, xs))
    finally:
        batcher.stop()
    assert all(np.array_equal(o, x + 1) for o, x in zip(outs, xs, strict=True))
    assert set(started) == {"aimass-batcher", "aimass-batcher-1"}
    assert batcher.pending == 0
    with pytest.raises(ValueError, match="workers"):
        DynamicBatcher(forward, workers=0)
