"""Serve defaults: the one home of every default a service or a replica starts with.

``aimass serve start`` (its click options), :class:`aimass_hpc.launch.serving.ServeOptions`
(and the successor options :func:`~aimass_hpc.launch.serving.service_options` reads back from
an older spec.json), the replica's entry point ``python -m aimass_hpc.serve`` (argparse help
and the options it resolves), :class:`~aimass_hpc.serve.app.ServeConfig` and
:class:`~aimass_hpc.serve.server.ReplicaOptions` all take their defaults from :data:`DEFAULTS`
(``tests/test_serve_defaults.py`` checks that they agree). It lives in ``serve/`` because the
job side may not import ``launch`` or ``cli``; they import it from here.

The site's ``[serving]`` section (partition, default reservation, bind, port range) holds
what differs per cluster; these are the defaults that do not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ServeDefaults:
    """Defaults of one service and its replicas (see the module docstring)."""

    # -- the service (``aimass serve start``; the job request)
    replicas: int = 1
    gpus: int = 0  # per replica
    cpus: int = 2  # per replica: one for HTTP, one for the forward (more for torch threads)
    # -- one replica
    host: str = "auto"  # this node's cluster address; never 0.0.0.0 unless asked
    port: int = 0  # any free port (in the site's range); the endpoint record says which
    device: str = "auto"
    max_batch_size: int = 64  # rows per forward, and per request
    max_wait_ms: float = 2.0  # longest wait to fill a batch
    batching: bool = True
    max_body_bytes: int = 64 * 1024 * 1024
    max_queue: int = 4096  # queued requests before 503
    drain_grace_s: float = 3.0  # keep answering this long after DRAINING
    drain_timeout_s: float = 30.0  # longest wait for in-flight requests
    threads: int | None = None  # torch threads; a service asks for cpus - 1
    log_level: str = "warning"
    # On the warning signal before the time limit, submit a replacement and drain once it is
    # READY (README "Serving"): on unless asked otherwise, for services and bare replicas alike.
    handover: bool = True
    restarts: int = 0  # crash restarts (a job takes the site's preemption.max_restarts)
    warning_signal: str = "USR1"  # a job takes the site's preemption.signal
    switch_interval_ms: float | None = None  # None: Python's own (5 ms)
    # The model runs in a process of its own, out of the HTTP event loop's GIL (see
    # serve/model_process.py); False: on a thread of the replica's process. None: in its own
    # process when the replica may use 2 or more CPUs and a full batch takes >= 1 ms (else
    # the pipes only cost).
    model_process: bool | None = None
    # -- waits on the login node
    ready_timeout_s: float = 600.0  # `serve start --wait`, `serve upgrade`
    stop_timeout_s: float = 120.0  # draining replicas after an upgrade
    # -- the supervisor (`serve start --supervise`) and its autoscaling (Ray Serve's defaults)
    check_interval_s: float = 3.0  # seconds between rounds of health checks
    check_failures: int = 3  # failed checks in a row before a replica is replaced
    autoscale_target_ongoing: float = 2.0  # ongoing requests per replica to aim at
    upscale_delay_s: float = 30.0  # the need must last this long before replicas are added
    downscale_delay_s: float = 600.0  # ... before replicas are taken away

    def replica_options(self) -> dict[str, Any]:
        """The options ``python -m aimass_hpc.serve`` resolves when nothing else says."""
        out = {k: v for k, v in asdict(self).items() if k in REPLICA_KEYS}
        out["port_range"] = None  # the job environment's (the site's port range)
        return out


REPLICA_KEYS = frozenset(
    {
        "host", "port", "device", "max_batch_size", "max_wait_ms", "batching",
        "max_body_bytes", "max_queue", "drain_grace_s", "drain_timeout_s", "threads",
        "log_level", "handover", "restarts", "warning_signal", "switch_interval_ms",
        "model_process",
    }
)  # fmt: skip
"""The fields a replica reads (the rest are the service's and the login node's)."""

DEFAULTS = ServeDefaults()
