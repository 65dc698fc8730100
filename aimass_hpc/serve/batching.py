"""Dynamic batching: many concurrent requests, one forward pass.

Request handlers run on the asyncio event loop and call :meth:`DynamicBatcher.submit`, which
queues the request's rows and awaits a future. One worker thread takes the oldest request,
adds whatever else is queued (up to ``max_batch_size`` rows) and, if the batch is still not
full, waits at most ``max_wait_ms`` counted from when that oldest request arrived, then runs
the forward once and hands every request its slice of the output.

Under load the worker is busy while new requests queue up, so by the time it comes back the
oldest request has already waited longer than ``max_wait_ms`` and the next batch goes out at
once: the wait only costs latency when the service is nearly idle. The forward runs outside
the event loop (torch releases the GIL), so HTTP parsing of the next requests overlaps it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aimass_hpc.serve.defaults import DEFAULTS

log = logging.getLogger(__name__)

ForwardFn = Callable[[np.ndarray], np.ndarray]
# (rows in the batch, requests in the batch, forward seconds, seconds the oldest one queued)
BatchObserver = Callable[[int, int, float, float], None]


class QueueFull(Exception):
    """The batcher already holds ``max_queue`` requests: shed load (HTTP 503)."""


class BatcherStopped(Exception):
    """The batcher is stopping and takes no new requests (HTTP 503)."""


@dataclass
class _Item:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


def _resolve(results: list[tuple[asyncio.Future[np.ndarray], np.ndarray | BaseException]]) -> None:
    # Runs on the event loop. A client that hung up cancelled its future: skip it.
    for fut, res in results:
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class DynamicBatcher:
    """Queue requests from an event loop and run them in batches on one worker thread.

    ``forward`` maps an array of N rows to an array whose first axis is N. With
    ``batching=False`` every request is forwarded alone (same thread, same queue), which is
    the baseline the benchmark compares against.
    """

    def __init__(
        self,
        forward: ForwardFn,
        *,
        max_batch_size: int = DEFAULTS.max_batch_size,
        max_wait_ms: float = DEFAULTS.max_wait_ms,
        batching: bool = DEFAULTS.batching,
        max_queue: int = DEFAULTS.max_queue,
        observer: BatchObserver | None = None,
        name: str = "aimass-batcher",
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batching = batching
        self.max_queue = max_queue
        self._observer = observer
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0  # batches being forwarded
        # More than one worker only pays when the forward runs elsewhere (a model process):
        # the next batch then waits in its pipe while the current one runs.
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}" if i else name, daemon=True)
            for i in range(workers)
        ]

    # -- public API ------------------------------------------------------------------------
    def start(self) -> DynamicBatcher:
        """Start the worker thread(s); returns self."""
        for thread in self._threads:
            thread.start()
        return self

    @property
    def pending(self) -> int:
        """Requests queued or in the forward pass right now."""
        return len(self._queue) + self._busy

    async def submit(self, inputs: np.ndarray) -> np.ndarray:
        """Queue ``inputs`` (N rows, N <= max_batch_size) and await the N output rows."""
        if inputs.shape[0] > self.max_batch_size:
            raise ValueError(f"{inputs.shape[0]} rows exceed max_batch_size")
        loop = asyncio.get_running_loop()
        item = _Item(inputs, loop.create_future(), loop)
        with self._cond:
            if self._stopping:
                raise BatcherStopped("service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests queued")
            self._queue.append(item)
            self._cond.notify()
        return await item.future

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish every queued request, then stop the worker (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # -- worker ----------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item] | None:
        """Block for the next batch; None once stopping and the queue is empty."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            items = [first]
            if not self.batching:
                self._busy += 1
                return items
            rows = first.rows
            deadline = first.enqueued + self.max_wait_s
            while rows < self.max_batch_size:
                if self._queue:
                    nxt = self._queue[0]
                    if rows + nxt.rows > self.max_batch_size:
                        break  # never split a request; it leads the next batch
                    items.append(self._queue.popleft())
                    rows += nxt.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self._busy += 1
            return items

    def _run(self) -> None:
        while True:
            items = self._take_batch()
            if items is None:
                return
            try:
                self._process(items)
            finally:
                with self._cond:
                    self._busy -= 1

    def _process(self, items: list[_Item]) -> None:
        live = [it for it in items if not it.future.cancelled()]
        if not live:
            return
        waited = time.monotonic() - live[0].enqueued
        t0 = time.perf_counter()
        results = self._forward_items(live)
        elapsed = time.perf_counter() - t0
        if self._observer is not None:
            try:
                self._observer(sum(it.rows for it in live), len(live), elapsed, waited)
            except Exception:  # metrics must never take the service down
                log.exception("batch observer failed")
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for it, res in zip(live, results, strict=True):
            by_loop.setdefault(it.loop, []).append((it.future, res))
        for loop, batch in by_loop.items():
            # A closed loop raises RuntimeError: its callers are gone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, batch)

    def _forward_items(self, items: list[_Item]) -> list[np.ndarray | BaseException]:
        if len(items) == 1:
            batch = items[0].inputs
        else:
            batch = np.concatenate([it.inputs for it in items], axis=0)
        try:
            out = self._forward(batch)
            if out.shape[0] != batch.shape[0]:
                raise RuntimeError(
                    f"model returned {out.shape[0]} rows for a batch of {batch.shape[0]}"
                )
        except Exception as exc:
            if len(items) == 1:
                log.exception("forward failed")
                return [exc]
            # One bad request must not fail its neighbours: retry them one by one.
            return [r for it in items for r in self._forward_items([it])]
        results: list[np.ndarray | BaseException] = []
        start = 0
        for it in items:
            results.append(out[start : start + it.rows])
            start += it.rows
        return results
