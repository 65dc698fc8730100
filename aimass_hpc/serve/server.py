"""One replica's life: listen, load, warm up, announce, serve, drain, stop.

The order matters for clients. The replica listens first (``/healthz`` answers while a large
model loads), then loads the model, then sends itself one real predict request over HTTP, and
only when that answers writes its endpoint record as READY. On SIGTERM/SIGINT it drains:
``/readyz`` turns 503 and the record says DRAINING, it keeps answering for ``drain_grace_s``
so that clients move to other replicas, then uvicorn stops accepting connections and finishes
the requests in flight, and the record says STOPPED.

On the warning signal (SIGUSR1, which the serve job asks Slurm to send before the time limit)
the replica calls its ``on_warning`` hook -- the job's handover, which submits a replacement
and waits for it to be READY -- and then drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from aimass_hpc.common.slurm_cli import job_ref_from_env, parse_signal
from aimass_hpc.repo.refs import Ref
from aimass_hpc.serve.app import Phase, ServeConfig, ServiceState, create_app
from aimass_hpc.serve.auth import ensure_token, token_path
from aimass_hpc.serve.batching import DynamicBatcher
from aimass_hpc.serve.codec import encode_npy
from aimass_hpc.serve.defaults import DEFAULTS
from aimass_hpc.serve.endpoints import (
    EndpointRecord,
    EndpointState,
    cluster_address,
    write_record,
)
from aimass_hpc.serve.metrics import ServeMetrics
from aimass_hpc.serve.model_loader import ServedModel
from aimass_hpc.serve.model_process import ModelProcess, reason_of

# Batcher threads (and pipes) per model process: one batch runs while the next one waits.
MODEL_PROCESS_CHANNELS = 2
MODEL_PROCESS_CHECK_S = 0.5  # how often a replica looks whether its model process still runs
# Unless asked, a model whose full batch runs faster than this stays on a thread.
MODEL_PROCESS_MIN_FORWARD_S = 0.001

log = logging.getLogger("aimass.serve")

# The default (serve/defaults.py); a job takes the site's preemption.signal.
WARNING_SIGNAL = signal.Signals(parse_signal(DEFAULTS.warning_signal))


def signal_number(name: str | int | None) -> int:
    """``USR1`` / ``SIGUSR1`` / ``B:USR1`` / ``10`` -> the signal number (default SIGUSR1)."""
    return int(WARNING_SIGNAL) if name is None or name == "" else parse_signal(name)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the replica decides what a signal means."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class ReplicaOptions:
    """Where and how one replica serves."""

    run_dir: Path
    model_ref: str
    model_name: str | None = None  # default: the name in model_ref
    host: str = DEFAULTS.host  # "auto": this node's cluster address; never 0.0.0.0 unless asked
    port: int = DEFAULTS.port  # 0: any free port (the record tells clients which)
    port_range: tuple[int, int] | None = None  # with port 0: pick a free one in this range
    warning_signal: str = DEFAULTS.warning_signal
    config: ServeConfig = field(default_factory=ServeConfig)
    job_id: str | None = None
    replica: int | None = None
    drain_grace_s: float = DEFAULTS.drain_grace_s
    drain_timeout_s: float = DEFAULTS.drain_timeout_s
    log_level: str = DEFAULTS.log_level
    # The model in a process of its own (serve/model_process.py; the loader must pickle);
    # None: when this process may use 2 or more CPUs.
    model_process: bool | None = DEFAULTS.model_process
    threads: int | None = DEFAULTS.threads  # torch threads of the model process


def use_model_process(asked: bool | None) -> bool:
    """Whether the model gets a process of its own: as asked, else with 2 or more CPUs.

    With the HTTP server and the model on different CPUs the model process is the faster
    (it never waits for the event loop's GIL); on one CPU both share, and the pipes and
    process switches only add work (``benchmarks/README.md``, serving throughput).
    """
    return asked if asked is not None else len(os.sched_getaffinity(0)) >= 2


def job_identity(opts: ReplicaOptions) -> tuple[str, int, str]:
    """(job id, replica index, node name) from options, else Slurm's environment.

    In a job array (one task per replica) the job id is ``ARRAYJOB_TASK`` -- what scancel
    and squeue accept -- and the replica index is the task id.
    """
    env = os.environ
    array_task = env.get("SLURM_ARRAY_TASK_ID")
    job_id = opts.job_id or job_ref_from_env(env) or f"local-{os.getpid()}"
    if opts.replica is not None:
        replica = opts.replica
    elif array_task:
        replica = int(array_task)
    else:
        replica = int(env.get("SLURM_PROCID", "0") or 0)
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    return job_id, replica, node


def bind_socket(host: str, port: int, port_range: tuple[int, int] | None = None) -> socket.socket:
    """A listening TCP socket on ``host:port``; port 0 picks a free one (in ``port_range``)."""
    if port == 0 and port_range is not None:
        low, high = port_range
        candidates = list(range(low, high + 1))
        random.shuffle(candidates)
        for candidate in candidates[:256]:
            try:
                return bind_socket(host, candidate)
            except OSError:
                continue
        raise OSError(f"no free port in {low}-{high} on {host}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Replica:
    """Runs one replica; :meth:`run` returns the process exit code."""

    def __init__(
        self,
        opts: ReplicaOptions,
        loader: Callable[[], ServedModel],
        on_warning: Callable[[Replica], Awaitable[None]] | None = None,
    ) -> None:
        self.opts = opts
        self.loader = loader
        self.on_warning = on_warning
        self.state = ServiceState(config=opts.config)
        self.metrics = ServeMetrics(frozenset())
        job_id, replica, node = job_identity(opts)
        name = opts.model_name or Ref.parse(opts.model_ref, "model_ref").name
        self.record = EndpointRecord(
            model_ref=opts.model_ref,
            model_name=name,
            version=None,
            state=EndpointState.LOADING,
            job_id=job_id,
            replica=replica,
            run_dir=str(opts.run_dir),
            pid=os.getpid(),
            node=node,
            token_file=str(token_path(opts.run_dir)),
        )
        self._stop: asyncio.Event | None = None
        self._warning = False
        self.server: _Server | None = None
        self.model_process: ModelProcess | None = None

    # -- control ----------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Drain and stop (what SIGTERM does). Safe from a signal handler on the loop."""
        if self._stop is not None:
            self._stop.set()

    def _on_warning_signal(self) -> None:
        self._warning = True
        self.request_stop()

    @property
    def url(self) -> str | None:
        """Base URL once listening."""
        return self.record.url

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until told to stop; 0 after a clean drain, 1 when the replica failed."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(
                signal_number(self.opts.warning_signal), self._on_warning_signal
            )
        write_record(self.record, EndpointState.LOADING)
        try:
            token = ensure_token(self.opts.run_dir)
            host = cluster_address() if self.opts.host == "auto" else self.opts.host
            sock = bind_socket(host, self.opts.port, self.opts.port_range)
        except Exception as exc:
            return self._fail(f"cannot listen on {self.opts.host}:{self.opts.port}: {exc}")
        port = sock.getsockname()[1]
        app = create_app(self.state, token, self.metrics)
        self.metrics.routes = frozenset(r.path for r in app.routes if hasattr(r, "path"))
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_level=self.opts.log_level,
            timeout_graceful_shutdown=int(self.opts.drain_timeout_s),
            timeout_keep_alive=30,
        )
        self.server = _Server(config)
        serve_task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started and not serve_task.done():
            await asyncio.sleep(0.01)
        if serve_task.done():
            return self._fail(f"HTTP server did not start: {serve_task.exception()}")
        write_record(self.record, EndpointState.LOADING, host=host, port=port)
        log.warning("listening on %s, loading %s", self.record.url, self.opts.model_ref)

        try:
            await self._load_and_warm(token)
        except Exception as exc:
            log.exception("model %s failed to load", self.opts.model_ref)
            self.server.should_exit = True
            await serve_task
            self._stop_batcher()
            return self._fail(reason_of(exc))
        if not self._stop.is_set():
            self.state.phase = Phase.READY
            write_record(self.record, EndpointState.READY)
            log.warning(
                "READY: %s version %s at %s",
                self.record.model_name,
                self.record.version,
                self.record.url,
            )

        stop_wait = asyncio.create_task(self._stop.wait())
        model_exit = asyncio.create_task(self._model_process_exit())
        await asyncio.wait({serve_task, stop_wait, model_exit}, return_when=asyncio.FIRST_COMPLETED)
        if serve_task.done():  # the server died under us: not a clean stop
            stop_wait.cancel()
            model_exit.cancel()
            self._stop_batcher()
            return self._fail(f"HTTP server exited: {serve_task.exception()}")
        if model_exit.done():  # no forward can succeed: FAILED at once, so it is replaced
            stop_wait.cancel()
            code = self._fail(f"the model process exited with code {model_exit.result()}")
            self.server.should_exit = True
            await serve_task
            self._stop_batcher()
            return code
        model_exit.cancel()
        if self._warning and self.on_warning is not None:
            try:
                await self.on_warning(self)
            except Exception:
                log.exception("warning-signal handover failed; draining anyway")
        await self._drain(serve_task)
        return 0

    async def _load_model(self) -> ServedModel:
        asked = self.opts.model_process
        if not use_model_process(asked):
            return await asyncio.to_thread(self.loader)
        self.model_process = ModelProcess(
            self.loader,
            channels=MODEL_PROCESS_CHANNELS,
            threads=self.opts.threads,
            ignore_signals=[signal_number(self.opts.warning_signal)],
            batch_rows=self.opts.config.max_batch_size,
        )
        model = await asyncio.to_thread(self.model_process.wait_loaded)
        took = model.batch_forward_s
        if asked is None and took is not None and took < MODEL_PROCESS_MIN_FORWARD_S:
            # A forward this cheap never waits long for the GIL; the pipes would only add
            # latency (p99 +1.3 ms for a 64-32-10 MLP in bench_serve): serve it on a thread.
            log.warning(
                "a batch of %d rows takes %.2f ms: the model runs on a thread of the replica "
                "(its own process pays from %g ms; --model-process asks for it)",
                self.opts.config.max_batch_size,
                took * 1e3,
                MODEL_PROCESS_MIN_FORWARD_S * 1e3,
            )
            await asyncio.to_thread(self.model_process.close)
            self.model_process = None
            return await asyncio.to_thread(self.loader)
        self.metrics.cuda_memory = self.model_process.cuda_memory
        return model

    async def _load_and_warm(self, token: str) -> None:
        model = await self._load_model()
        await asyncio.to_thread(model.warm_up)
        cfg = self.opts.config
        batcher = DynamicBatcher(
            model.forward,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            batching=cfg.batching,
            max_queue=cfg.max_queue,
            observer=self.metrics.observe_batch,
            workers=MODEL_PROCESS_CHANNELS if self.model_process is not None else 1,
        ).start()
        self.state.attach(model, batcher)
        self.metrics.set_model(
            {
                "name": model.name,
                "ref": model.ref,
                "version": model.version,
                "device": str(model.device),
            }
        )
        self.record.model_name = model.name
        self.record.version = model.version
        # Warm-up through the real network path: READY means a request was answered.
        example = model.spec.example(1)
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(timeout=60.0, trust_env=False) as client:
            if example is None:  # input shape unknown: the API path without a forward
                resp = await client.get(f"{self.record.url}/v1/models", headers=auth)
            else:
                resp = await client.post(
                    f"{self.record.url}/v1/predict",
                    content=encode_npy(example),
                    headers={**auth, "Content-Type": "application/x-npy"},
                )
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request answered {resp.status_code}: {resp.text[:200]}")

    async def _drain(self, serve_task: asyncio.Task[None]) -> None:
        assert self.server is not None
        self.state.phase = Phase.DRAINING
        write_record(self.record, EndpointState.DRAINING)
        log.warning("draining %s", self.record.url)
        # Keep answering while clients notice (readyz 503, record DRAINING) and move away.
        deadline = time.monotonic() + self.opts.drain_grace_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.server.should_exit = True
        await serve_task  # uvicorn finishes the requests in flight
        self._stop_batcher()
        write_record(self.record, EndpointState.STOPPED)
        log.warning("stopped %s", self.record.key)

    def _stop_batcher(self) -> None:
        if self.state.batcher is not None:
            self.state.batcher.stop()
        if self.model_process is not None:
            self.model_process.close()

    async def _model_process_exit(self) -> int | None:
        """Returns once the model process has died (its exit code); never without one."""
        proc = self.model_process
        if proc is None:  # the model runs on a thread: nothing to watch
            await asyncio.get_running_loop().create_future()
        assert proc is not None
        while proc.alive():
            await asyncio.sleep(MODEL_PROCESS_CHECK_S)
        return proc.proc.exitcode

    def _fail(self, message: str) -> int:
        self.state.phase = Phase.FAILED
        self.state.message = message
        log.error("replica failed: %s", message)
        write_record(self.record, EndpointState.FAILED, message=message)
        return 1


def run_replica(
    opts: ReplicaOptions,
    loader: Callable[[], ServedModel],
    on_warning: Callable[[Replica], Awaitable[None]] | None = None,
) -> int:
    """Run a replica to the end on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(Replica(opts, loader, on_warning).run())
