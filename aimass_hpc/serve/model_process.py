"""The served model in a process of its own, so that its forward never waits for the GIL.

In one process the forward thread takes the GIL back after every torch op, and the event
loop (HTTP parsing, codecs, answers) holds it in slices of a few hundred microseconds: on
this project's 2-core benchmark the model ran ~20% slower inside the replica than alone
(``benchmarks/README.md``, serving throughput). vLLM splits its API server and engine core
into two processes for the same reason, as Triton and TorchServe run models in workers.

The parent (the replica: HTTP, batching) starts the child with ``spawn`` (no fork of a
process with threads, CUDA or OpenMP state). The child runs the loader, warms the model up,
and then answers forward requests on ``channels`` pipes, one per batcher thread, so that the
next batch is already waiting in a pipe while the current one runs. One more pipe carries
the load's outcome. On a GPU each answer also carries the child's CUDA memory figures, which
the parent's ``/metrics`` shows (asking the child would block the event loop for a batch).

The child ignores the termination signals: Slurm signals every process of a step, and the
replica keeps answering while it drains. It ends when the parent closes the pipes (or dies:
the pipes reach end-of-file), and :meth:`ModelProcess.close` kills it if it does not.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import queue
import selectors
import signal
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import numpy as np
import torch

from aimass_hpc.serve.metrics import cuda_memory
from aimass_hpc.serve.model_loader import ServedModel

# Stopping is the parent's decision (it drains first); these would end the child mid-answer.
_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_CLOSE_TIMEOUT_S = 10.0


class ModelProcessError(RuntimeError):
    """The model process failed to load the model or stopped answering."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteForwardError(RuntimeError):
    """The model raised on a batch; ``reason`` is its ``Type: message``, as in one process."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reason_of(exc: BaseException) -> str:
    """``Type: message`` of an exception, the model's own type for one raised in the child."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else f"{type(exc).__name__}: {exc}"


def _batch_forward_s(model: ServedModel, rows: int) -> float | None:
    """The best of 3 forwards of ``rows`` zero samples, in seconds (None: not measurable)."""
    example = model.spec.example(rows)
    if example is None:
        return None
    best = float("inf")
    try:
        for _ in range(3):
            start = time.perf_counter()
            model.forward(example)
            best = min(best, time.perf_counter() - start)
    except Exception:  # e.g. no memory for a full batch of zeros: requests will tell
        return None
    return best


def _describe(model: ServedModel, batch_rows: int) -> dict[str, Any]:
    return {
        "batch_forward_s": _batch_forward_s(model, batch_rows),
        "cuda_memory": cuda_memory() if model.device.type == "cuda" else {},
        "name": model.name,
        "ref": model.ref,
        "version": model.version,
        "device": str(model.device),
        "spec": model.spec,
        "metadata": model.metadata,
        "output_shape": model.output_shape,
        "parameters": model.parameter_count(),
    }


# One message per batch each way: kind, len(dtype), ndim, len(extra); dtype; dims; extra;
# the array's bytes. Pickled headers plus a second message cost a third of the time a small
# model's batch takes (ForkingPickler is built anew for every message).
_FRAME = struct.Struct("<BBBI")
_OK, _ERROR = 0, 1


def _frame(kind: int, arr: np.ndarray | None = None, extra: bytes = b"") -> bytes:
    if arr is None:
        return _FRAME.pack(kind, 0, 0, len(extra)) + extra
    dtype = arr.dtype.str.encode("ascii")
    dims = struct.pack(f"<{arr.ndim}q", *arr.shape)
    head = _FRAME.pack(kind, len(dtype), arr.ndim, len(extra)) + dtype + dims + extra
    return b"".join((head, arr.data.cast("B") if arr.size else b""))


def _unframe(buf: bytes) -> tuple[int, np.ndarray | None, bytes]:
    """(kind, the array (read-only, on ``buf``) or None, extra) of one message."""
    kind, n_dtype, ndim, n_extra = _FRAME.unpack_from(buf)
    pos = _FRAME.size
    if n_dtype == 0:
        return kind, None, buf[pos : pos + n_extra]
    dtype = np.dtype(buf[pos : pos + n_dtype].decode("ascii"))
    pos += n_dtype
    shape = struct.unpack_from(f"<{ndim}q", buf, pos)
    pos += 8 * ndim
    extra = buf[pos : pos + n_extra]
    arr = np.frombuffer(buf, dtype=dtype, offset=pos + n_extra).reshape(shape)
    return kind, arr, extra


def _child_main(
    channels: Sequence[Connection],
    control: Connection,
    loader: Callable[[], ServedModel],
    threads: int | None,
    ignore: Sequence[int],
    batch_rows: int,
) -> None:
    """The model process: load, warm up, then answer until the parent closes the pipes."""
    for sig in {*_IGNORED_SIGNALS, *ignore}:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    try:
        model = loader()
        model.warm_up()
        control.send(("ready", _describe(model, batch_rows)))
    except BaseException as exc:  # the parent reports it as the replica's failure
        control.send(("error", reason_of(exc)))
        return
    on_gpu = model.device.type == "cuda"
    with selectors.DefaultSelector() as selector:  # registered once, not per wait
        for conn in (*channels, control):
            selector.register(conn, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                conn = cast(Connection, key.fileobj)
                try:
                    _, batch, _ = _unframe(conn.recv_bytes())
                except (EOFError, OSError):
                    return  # the parent closed the pipes (all together), or died
                if batch is None:
                    continue
                try:
                    out = np.ascontiguousarray(model.forward(batch))
                except Exception as exc:
                    conn.send_bytes(_frame(_ERROR, extra=reason_of(exc).encode()))
                    continue
                stats = json.dumps(cuda_memory()).encode() if on_gpu else b""
                conn.send_bytes(_frame(_OK, out, stats))


@dataclass
class RemoteModel(ServedModel):
    """A :class:`ServedModel` whose module lives in the model process (``module`` is None)."""

    process: ModelProcess | None = field(default=None, repr=False)
    parameters: int = 0
    batch_forward_s: float | None = None  # a full batch's forward, measured in the child

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the model process on ``batch``."""
        assert self.process is not None
        return self.process.forward(batch)

    def warm_up(self) -> np.ndarray | None:
        """One zero sample through the pipes (the child warmed the model itself up)."""
        example = self.spec.example(1)
        return None if example is None else self.forward(example)

    def parameter_count(self) -> int:
        """The child's count (the module is not here)."""
        return self.parameters


class ModelProcess:
    """Start the model process and talk to it (see the module docstring).

    ``loader`` must be picklable (a module-level function or a ``functools.partial`` of one):
    it runs in the child.
    """

    def __init__(
        self,
        loader: Callable[[], ServedModel],
        *,
        channels: int = 2,
        threads: int | None = None,
        ignore_signals: Sequence[int] = (),
        batch_rows: int = 1,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        pipes = [ctx.Pipe() for _ in range(channels + 1)]
        self._free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        for parent_end, _ in pipes[:-1]:
            self._free.put(parent_end)
        self._ends = [p for p, _ in pipes]
        self._control = pipes[-1][0]
        self._cuda_memory: dict[str, dict[str, float]] = {}
        child_ends = [c for _, c in pipes]
        self.proc = ctx.Process(
            target=_child_main,
            args=(
                child_ends[:-1],
                child_ends[-1],
                loader,
                threads,
                tuple(ignore_signals),
                batch_rows,
            ),
            name="aimass-model",
        )
        self.proc.start()
        for end in child_ends:
            end.close()  # the child holds them now: a dead child means end-of-file here
        self.closed = False

    # -- start -------------------------------------------------------------------------------
    def wait_loaded(self) -> RemoteModel:
        """Block until the child has loaded and warmed up the model; its description."""
        try:
            head = self._control.recv()
        except (EOFError, OSError):
            self.proc.join(5.0)
            raise ModelProcessError(
                f"the model process exited with code {self.proc.exitcode} while loading"
            ) from None
        if head[0] != "ready":
            self.close()
            raise ModelProcessError(str(head[1]))
        info = head[1]
        self._cuda_memory = info["cuda_memory"]
        return RemoteModel(
            name=info["name"],
            ref=info["ref"],
            version=info["version"],
            module=cast(torch.nn.Module, None),
            device=torch.device(info["device"]),
            spec=info["spec"],
            metadata=info["metadata"],
            output_shape=info["output_shape"],
            process=self,
            parameters=int(info["parameters"]),
            batch_forward_s=info["batch_forward_s"],
        )

    # -- use ---------------------------------------------------------------------------------
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The model's output rows for ``batch`` (thread-safe: one pipe per caller at a time)."""
        message = _frame(_OK, np.ascontiguousarray(batch))
        conn = self._free.get()
        try:
            conn.send_bytes(message)
            kind, out, extra = _unframe(conn.recv_bytes())
            if kind == _ERROR or out is None:
                raise RemoteForwardError(extra.decode(errors="replace"))
            if extra:
                self._cuda_memory = json.loads(extra)
            return out
        except (EOFError, OSError) as exc:
            raise ModelProcessError(
                f"the model process is gone (exit code {self.proc.exitcode}): {type(exc).__name__}"
            ) from None
        finally:
            self._free.put(conn)

    def cuda_memory(self) -> dict[str, dict[str, float]]:
        """:func:`cuda_memory` of the child as of its last answer (empty on CPU)."""
        return self._cuda_memory

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.proc.is_alive()

    def close(self) -> None:
        """Close the pipes (the child ends), then kill it if it has not within 10 s."""
        if self.closed:
            return
        self.closed = True
        for end in self._ends:
            end.close()
        self.proc.join(_CLOSE_TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
