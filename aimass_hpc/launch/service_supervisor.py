"""The service supervisor: keeps a service at its desired state (``aimass serve --supervise``).

A small CPU batch job, started beside the replicas, running::

    python -m aimass_hpc.launch.service_supervisor RUN_DIR [--site SITE]

It is login-side code (like the search driver's ``--detach`` job): it reads the service's
``desired.json`` (model, replicas, check settings; written atomically by ``aimass serve`` and
changed by ``serve stop``/``upgrade``) and every ``interval`` seconds

* asks the scheduler, in one call, about every live replica's job;
* checks every READY replica with a real request, each engine its own way (the record's
  ``engine``, else the service's ``spec.json``): the built-in torch server ``GET /healthz`` and
  ``POST /v1/predict`` on a probe input of the model's input shape and dtype (from
  ``GET /v1/models``, i.e. the model's recipe); a vLLM replica ``GET /readyz`` and
  ``POST /v1/completions`` of one token for the served model name, with the service token;
* replaces a replica whose job ended, that has been LOADING too long (hung while loading), or
  that failed its checks ``failures`` times in a row: the old record is *fenced* (FAILED with
  the reason; a replica that wakes up later cannot set it READY again), its job is cancelled if
  still there, and a new job for the same array task is submitted from the run directory's own
  ``job.sh`` (what ``serve start`` queued; a handover does the same) with a PENDING record;
* stops replicas above the desired count.

Autoscaling reads ongoing requests per replica from each READY replica's ``/metrics``: for
torch the busy time of predict requests between two scrapes (Little's law), for vLLM the gauges
``vllm:num_requests_running`` + ``vllm:num_requests_waiting``.

A replica whose job is queued (PENDING) counts as coming, not missing. Every decision goes to
``decisions.jsonl`` (append-only) with its reason; ``supervisor.json`` holds a heartbeat.
``serve.stop`` in the run directory (``aimass serve stop``) or a desired state other than
``running`` ends the supervisor without touching anything.

At most one supervisor acts for a service: each round it renews (or takes) a :class:`Lease`
in the run directory (``supervisor.lease.N``: holder's job id, restart count, expiry). One
without the lease -- a second supervisor started by hand, or a run whose predecessor is
still there -- waits on standby and logs ``standby: supervisor JOB holds the lease``. Every
decision names the supervisor that made it (``supervisor``: ``JOB``, ``JOB/rN`` after N
requeues, or ``HOST:PID``). On the site's warning signal before its time limit (or when the
time left says the warning is due: a warning sent late, or before the handler listened) the
job releases the lease and requeues itself; its next run takes the lease over and carries
on from the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aimass_hpc.common.errors import AimassError, NotFoundError, SchedulerError
from aimass_hpc.common.fsutil import atomic_write_json, atomic_write_text, fsync_dir, read_json
from aimass_hpc.common.slurm_cli import digits_or_none, parse_signal, time_left
from aimass_hpc.config.site import Site, load_site
from aimass_hpc.launch.scheduler import Scheduler, get_scheduler
from aimass_hpc.launch.scheduler.base import JobStatus
from aimass_hpc.launch.serving import (
    CHECK_FAILURES,
    CHECK_INTERVAL_S,
    SUPERVISOR_FILE,
    read_desired,
    read_supervisor,
    record_decision,
    set_desired,
)
from aimass_hpc.serve.auth import read_token
from aimass_hpc.serve.endpoints import (
    EndpointRecord,
    EndpointState,
    now_iso,
    read_records,
    stop_requested,
    write_record,
)

DEFAULT_INTERVAL_S = CHECK_INTERVAL_S  # seconds between rounds of checks
DEFAULT_FAILURES = CHECK_FAILURES  # checks failed in a row before a replica is replaced
DEFAULT_PROBE_TIMEOUT_S = 3.0  # per HTTP check
DEFAULT_LOAD_TIMEOUT_S = 600.0  # LOADING longer than this (job running): hung while loading
# A completion waits in vLLM's queue behind the load it is serving: a busy replica is not a
# hung one, so its check gets at least this long.
VLLM_PROBE_TIMEOUT_S = 10.0
_LIVE = {EndpointState.PENDING, EndpointState.LOADING, EndpointState.READY}
# Seconds spent answering predict requests so far (serve/metrics.py's latency histogram).
_BUSY = re.compile(
    r'^aimass_serve_request_duration_seconds_sum\{route="/v1/predict"\} ([0-9.eE+-]+)$',
    re.MULTILINE,
)
# vLLM's gauges of requests being served and queued (one line per engine / label set).
_VLLM_ONGOING = re.compile(
    r"^vllm:num_requests_(?:running|waiting)(?:\{[^}\n]*\})?[ \t]+(\S+)",
    re.MULTILINE,
)


# The sum of the latencies of vLLM's finished requests (a histogram's _sum, per label set).
_VLLM_BUSY = re.compile(
    r"^vllm:e2e_request_latency_seconds_sum(?:\{[^}\n]*\})?[ \t]+(\S+)",
    re.MULTILINE,
)


def _sum_matches(pattern: re.Pattern[str], metrics_text: str) -> float | None:
    """The finite values ``pattern`` captures in ``metrics_text``, added up; None if none."""
    total, seen = 0.0, False
    for match in pattern.finditer(metrics_text):
        try:
            value = float(match.group(1))
        except ValueError:
            continue
        if math.isfinite(value):
            total += value
            seen = True
    return total if seen else None


def vllm_ongoing(metrics_text: str) -> float | None:
    """Requests running + waiting in a vLLM replica's Prometheus ``/metrics`` text (summed
    over label sets); None when the text has neither gauge."""
    return _sum_matches(_VLLM_ONGOING, metrics_text)


def vllm_busy_seconds(metrics_text: str) -> float | None:
    """Seconds spent by the replica's finished requests so far (the growth of this over a
    time span is the mean number of requests in flight: Little's law); None if absent."""
    return _sum_matches(_VLLM_BUSY, metrics_text)


# -- the lease: at most one supervisor acts for a service -----------------------------------

LEASE_PREFIX = "supervisor.lease."  # supervisor.lease.<generation>: JSON, one per holder
LEASE_MIN_TTL_S = 60.0  # a holder that has not renewed for this long has lost its lease
LEASE_TTL_ROUNDS = 5  # ... or for this many rounds, when that is longer


def lease_ttl(interval_s: float) -> float:
    """How long a lease lasts without renewal: several rounds (a round of checks can take a
    while: probe timeouts, sbatch), at least :data:`LEASE_MIN_TTL_S`."""
    return max(LEASE_MIN_TTL_S, LEASE_TTL_ROUNDS * interval_s)


def who_am_i(env: dict[str, str] | None = None) -> dict[str, Any]:
    """This supervisor's identity: its Slurm job id and restart count, host and pid.
    ``ident`` names it in decisions: ``JOB`` (``JOB/rN`` after a requeue) or ``HOST:PID``."""
    env = dict(os.environ) if env is None else env
    job = env.get("SLURM_JOB_ID") or None
    restart = (digits_or_none(env.get("SLURM_RESTART_COUNT")) or 0) if job else 0
    host, pid = socket.gethostname(), os.getpid()
    ident = (f"{job}/r{restart}" if restart else job) if job else f"{host}:{pid}"
    return {"ident": ident, "job_id": job, "restart": restart, "host": host, "pid": pid}


class Lease:
    """A lease on supervising one service, in its run directory, safe on NFS and Lustre.

    Holders follow each other in *generations*: ``supervisor.lease.N`` is held by the holder
    of the highest N. Taking over creates generation N+1 with an exclusive hard link of a
    complete file (``link(2)`` is atomic on network filesystems where ``O_EXCL`` and fcntl
    locks may not be), so of two contenders exactly one wins. The holder renews its own file
    each round (atomic rename); a lease is free when released (the holder's clean exit), past
    its expiry, or when its holder is gone -- its Slurm job ended or is queued again (the
    requeued job's previous run), or its process on this host is dead.
    """

    def __init__(
        self,
        run_dir: Path,
        me: dict[str, Any],
        *,
        ttl_s: float = LEASE_MIN_TTL_S,
        scheduler: Scheduler | None = None,
        clock: Any = time.time,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.me = me
        self.ttl_s = ttl_s
        self.scheduler = scheduler
        self.clock = clock
        self.token = os.urandom(8).hex()  # this holder, even within one job and process
        self.generation: int | None = None  # the generation held, if any

    def path(self, generation: int) -> Path:
        """The file of lease ``generation``."""
        return self.run_dir / f"{LEASE_PREFIX}{generation}"

    def current(self) -> tuple[int, dict[str, Any] | None]:
        """The highest generation and its holder (0, None when nobody ever held it)."""
        gens = []
        for p in self.run_dir.glob(f"{LEASE_PREFIX}*"):
            suffix = p.name[len(LEASE_PREFIX) :]
            if suffix.isdigit() and suffix.isascii():
                gens.append(int(suffix))
        if not gens:
            return 0, None
        top = max(gens)
        try:
            doc = read_json(self.path(top))
        except (OSError, ValueError):
            doc = None
        return top, doc if isinstance(doc, dict) else {}

    def acquire(self) -> tuple[bool, dict[str, Any] | None]:
        """Renew the lease held, or take a free one; (held now, the holder's document)."""
        now = self.clock()
        gen, doc = self.current()
        mine = doc is not None and doc.get("token") == self.token
        fresh = doc is not None and now < _number(doc.get("expires")) - self.ttl_s / 4
        if doc is not None and mine and fresh and gen == self.generation:
            doc.update(renewed=now, expires=now + self.ttl_s)
            atomic_write_json(self.path(gen), doc)
            return True, doc
        self.generation = None
        why: str | None = "nobody held it"
        if doc is not None and not mine:
            why = self.free(doc)
            if why is None:
                return False, doc
        elif mine:
            why = "renewing late"  # near expiry: a contender may take it now, so race for it
        new = {
            **self.me, "token": self.token, "generation": gen + 1, "acquired": now,
            "renewed": now, "expires": now + self.ttl_s, "took_over": _holder(doc), "why": why,
        }  # fmt: skip
        if not self._create(self.path(gen + 1), new):
            _, winner = self.current()
            return False, winner
        self.generation = gen + 1
        for old in range(max(gen - 1, 1), gen):  # keep the one taken over, as evidence
            with contextlib.suppress(OSError):
                self.path(old).unlink()
        return True, new

    def free(self, doc: dict[str, Any]) -> str | None:
        """Why the lease ``doc`` describes may be taken, or None while its holder has it."""
        if not doc:
            return "its file is unreadable"  # a complete file is linked in: never half-written
        if doc.get("released"):
            return f"released by {doc.get('ident')}"
        if _number(doc.get("expires")) <= self.clock():
            return f"{doc.get('ident')} let it expire"
        gone = self.holder_gone(doc)
        return f"{doc.get('ident')} is gone ({gone})" if gone else None

    def holder_gone(self, doc: dict[str, Any]) -> str | None:
        """Why the holder of ``doc`` can be known to run no more, else None."""
        job, restart = doc.get("job_id"), int(_number(doc.get("restart")))
        if job:
            if job == self.me.get("job_id"):
                # Slurm runs one attempt of a job at a time: an earlier attempt has ended.
                return "an earlier run of this job" if restart < self.me["restart"] else None
            if self.scheduler is None:
                return None
            try:
                st = self.scheduler.status([str(job)]).get(str(job))
            except SchedulerError:
                return None  # cannot ask: wait for the expiry
            if st is None or st.lookup_failed:
                return None
            if st.is_terminal or st.not_found:
                return f"job {job} {st.state.value}"
            if st.state.value == "PENDING" or st.restart_count > restart:
                return f"job {job} was requeued"
            return None
        if doc.get("host") == self.me.get("host") and isinstance(doc.get("pid"), int):
            try:
                os.kill(doc["pid"], 0)
            except ProcessLookupError:
                return f"process {doc['pid']} ended"
            except PermissionError:
                return None
        return None

    def release(self) -> None:
        """Give the lease up now (a clean exit or a requeue): a successor takes it at once."""
        if self.generation is None:
            return
        gen, doc = self.current()
        self.generation = None
        if gen and doc and doc.get("token") == self.token:
            doc.update(released=self.clock(), expires=0)
            with contextlib.suppress(OSError):
                atomic_write_json(self.path(gen), doc)

    def _create(self, path: Path, doc: dict[str, Any]) -> bool:
        """Publish ``doc`` at ``path`` only if nothing is there (a complete file, linked)."""
        import json

        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            atomic_write_text(tmp, json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_dir(path.parent)
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _number(value: Any) -> float:
    """A number from a lease document (0 when missing or not a number)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _holder(doc: dict[str, Any] | None) -> str | None:
    return str(doc.get("ident")) if doc else None


@dataclass
class Settings:
    """How the supervisor checks (``desired.json`` ``supervisor`` section, else defaults)."""

    interval_s: float = DEFAULT_INTERVAL_S
    failures: int = DEFAULT_FAILURES
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S

    @classmethod
    def from_desired(cls, desired: dict[str, Any] | None) -> Settings:
        """Settings from a desired-state document (unknown or bad values: the defaults)."""
        raw = (desired or {}).get("supervisor") or {}
        out = cls()
        for key in ("interval_s", "failures", "probe_timeout_s", "load_timeout_s"):
            value = raw.get(key) if isinstance(raw, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                setattr(out, key, type(getattr(out, key))(value))
        return out


@dataclass
class Supervisor:
    """One service's supervisor (see the module docstring). :meth:`tick` is one round."""

    site: Site
    run_dir: Path
    scheduler: Scheduler | None = None
    fails: dict[str, int] = field(default_factory=dict)  # record key -> failed checks in a row
    probes: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # key -> shape, dtype
    replaced: int = 0
    busy: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (t, busy s)
    _scale_since: tuple[str, float] | None = None  # direction wanted, since when
    _service_engine: str | None = None  # spec.json's serve.engine, read once
    _stop: str | None = None
    me: dict[str, Any] = field(default_factory=who_am_i)  # this supervisor (who_am_i)
    lease: Lease | None = None  # at most one supervisor acts for the service (run)
    _holding: bool = False  # held the lease last round
    _standby_for: str | None = None  # the holder last logged as such while on standby
    _warn_at: float | None = None  # monotonic time the time-limit warning is due
    _warn_why: str = ""  # how the time-limit warning came: the signal, or the time left

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.scheduler is None:
            self.scheduler = get_scheduler(self.site)
        if self.lease is None:
            self.lease = Lease(self.run_dir, self.me, scheduler=self.scheduler)

    def _decide(self, action: str, why: str, **details: Any) -> dict[str, Any]:
        """Record a decision, naming this supervisor (``supervisor``: :func:`who_am_i`)."""
        return record_decision(self.run_dir, action, why, supervisor=self.me["ident"], **details)

    # -- one round -------------------------------------------------------------------------
    def tick(self) -> list[dict[str, Any]]:
        """Check every replica once and act; returns the decisions taken."""
        desired = read_desired(self.run_dir)
        if stop_requested(self.run_dir) or not desired or desired.get("state") != "running":
            return []
        settings = Settings.from_desired(desired)
        want = int(desired.get("replicas") or 0)
        decisions: list[dict[str, Any]] = []
        records = [r for r in read_records(self.run_dir) if _state(r) in _LIVE]
        statuses = self._statuses(records)
        for rec in records:
            why = self._judge(rec, statuses.get(rec.job_id), settings)
            if why is not None:
                decisions.append(self._fence(rec, why))
        if stop_requested(self.run_dir):  # `serve stop` began during the checks
            return decisions
        live = [r for r in read_records(self.run_dir) if _state(r) in _LIVE and not r.fenced]
        scaled = self.autoscale(desired, live)
        if scaled is not None:
            decisions.append(scaled)
            want = int(scaled["to"])
        for index in range(want):
            if not any(r.replica == index for r in live):
                decisions.append(self._replace(index, live_model(desired)))
        for rec in live:
            if rec.replica >= want:
                decisions.append(self._fence(rec, f"scale down to {want} replica(s)", bad=False))
        return decisions

    def _statuses(self, records: Sequence[EndpointRecord]) -> dict[str, JobStatus]:
        assert self.scheduler is not None
        if not records:
            return {}
        try:
            return self.scheduler.status([r.job_id for r in records])
        except SchedulerError:
            return {}  # cannot ask this round: judge by the checks alone

    def _judge(
        self, rec: EndpointRecord, status: JobStatus | None, settings: Settings
    ) -> str | None:
        """Why ``rec`` must be replaced, or None while it is fine (or coming)."""
        if status is not None and status.is_terminal:
            return f"job {rec.job_id} ended {status.state.value}" + (
                f" ({status.reason})" if status.reason else ""
            )
        state = _state(rec)
        if state is EndpointState.PENDING:
            return None  # queued or starting: coming, not missing
        if state is EndpointState.LOADING:
            age = _age_s(rec.started)
            running = status is not None and status.state.value == "RUNNING"
            if running and age is not None and age > settings.load_timeout_s:
                return f"LOADING for {age:.0f}s (over {settings.load_timeout_s:g}s)"
            return None
        problem = self.check(rec, settings.probe_timeout_s)
        if problem is None:
            self.fails.pop(rec.key, None)
            return None
        count = self.fails.get(rec.key, 0) + 1
        self.fails[rec.key] = count
        self._decide(
            "check-failed", problem, replica=rec.replica, job_id=rec.job_id,
            count=count, limit=settings.failures,
        )  # fmt: skip
        if count >= settings.failures:
            return f"failed {count} checks in a row (last: {problem})"
        return None

    def engine(self, rec: EndpointRecord) -> str:
        """The engine serving ``rec``: its record's, else the service's (``spec.json``)."""
        if rec.engine:
            return rec.engine
        if self._service_engine is None:
            try:
                doc = read_json(self.run_dir / "spec.json")
                serve = (doc.get("spec") or {}).get("serve") or {}
                self._service_engine = str(serve.get("engine") or "torch")
            except (OSError, ValueError, AttributeError):
                return "torch"  # unreadable now: ask again next round
        return self._service_engine

    def check(self, rec: EndpointRecord, timeout: float) -> str | None:
        """Readiness and a real request (torch: a predict on a probe input; vLLM: a one-token
        completion); None when both pass, else why."""
        url = rec.url
        if url is None:
            return "READY without an address"
        try:
            token = read_token(rec.token_file) if rec.token_file else None
        except AimassError as exc:
            return f"token: {exc}"
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        if self.engine(rec) == "vllm":
            return check_vllm(rec, url, auth, max(timeout, VLLM_PROBE_TIMEOUT_S))
        try:
            with httpx.Client(timeout=timeout, trust_env=False) as http:
                resp = http.get(f"{url}/healthz")
                if resp.status_code != 200:
                    return f"/healthz answered {resp.status_code}"
                shape, dtype = self._probe_shape(http, rec, url, auth)
                import numpy as np

                x = np.zeros([1, *shape], dtype=dtype)
                body = {"inputs": x.tolist(), "dtype": dtype}
                resp = http.post(f"{url}/v1/predict", json=body, headers=auth)
                if resp.status_code != 200:
                    return f"probe predict answered {resp.status_code}: {resp.text[:120]}"
        except httpx.TimeoutException:
            return f"no answer within {timeout:g}s (hung?)"
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return f"{type(exc).__name__}: {str(exc)[:160]}"
        return None

    def _probe_shape(
        self, http: httpx.Client, rec: EndpointRecord, url: str, auth: dict[str, str]
    ) -> tuple[list[int], str]:
        """The model's input shape and dtype (from the replica's ``/v1/models``, its recipe)."""
        if rec.key not in self.probes:
            resp = http.get(f"{url}/v1/models", headers=auth)
            resp.raise_for_status()
            info = resp.json()["models"][0]
            shape = [int(d) if d and int(d) > 0 else 1 for d in info.get("input_shape") or []]
            self.probes[rec.key] = (shape, str(info.get("input_dtype") or "float32"))
        return self.probes[rec.key]

    # -- autoscaling ---------------------------------------------------------------------------
    def autoscale(
        self, desired: dict[str, Any], live: Sequence[EndpointRecord]
    ) -> dict[str, Any] | None:
        """Change the desired replica count when ongoing requests per replica have been off
        the target long enough (up- and down-scale delays); the decision, or None.

        Ongoing requests are each READY replica's mean number of predict requests in flight
        since the last round: the growth of ``aimass_serve_request_duration_seconds_sum``
        over the time between two scrapes of ``/metrics`` (Little's law); for vLLM, the
        larger of that mean (from ``vllm:e2e_request_latency_seconds_sum``) and its running +
        waiting gauges now. The replica count is what is live -- PENDING (queued) replicas
        count as coming, not as missing -- and there is no scaling down while a replica is
        LOADING.
        """
        auto = desired.get("autoscale")
        if not isinstance(auto, dict):
            return None
        lo, hi = int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
        target = float(auto.get("target_ongoing", 2.0))
        current = int(desired.get("replicas") or 0)
        rates = [self._ongoing(r) for r in live if _state(r) is EndpointState.READY]
        known = [x for x in rates if x is not None]
        if not known:
            return None  # nothing measured yet this round: no decision on no data
        ongoing = sum(known) * (len(rates) / len(known))  # an unmeasured one: like the others
        want = min(max(math.ceil(ongoing / target - 1e-9), lo), hi)
        now = time.monotonic()
        if want == current:
            self._scale_since = None
            return None
        direction = "up" if want > current else "down"
        if direction == "down" and any(_state(r) is EndpointState.LOADING for r in live):
            # A replica that is starting has its allocation and is loading its model: judge
            # slack once it serves. While it starts, the node is busy and the measurement
            # dips (seen on the dev cluster: a second vLLM starting under load took the CPU
            # for 90 s, the first replica's ongoing read ~1 of 6), which would retire it
            # before it ever served -- and scale up again a moment later.
            self._scale_since = None
            return None
        if self._scale_since is None or self._scale_since[0] != direction:
            self._scale_since = (direction, now)
        key = "upscale_delay_s" if direction == "up" else "downscale_delay_s"
        delay = float(auto.get(key) or 0.0)
        if now - self._scale_since[1] < delay:
            return None
        self._scale_since = None
        set_desired(self.run_dir, replicas=want)
        why = (
            f"{ongoing:.2f} ongoing requests on {len(rates)} READY of {current} replica(s), "
            f"target {target:g} per replica, for {delay:g}s"
        )
        return self._decide(f"scale-{direction}", why, to=want, ongoing=round(ongoing, 3))

    def _ongoing(self, rec: EndpointRecord) -> float | None:
        """Requests in flight at ``rec``: torch, the mean since the previous scrape (None on
        the first); vLLM, the larger of running + waiting now and that mean. None when
        /metrics did not answer."""
        if rec.url is None:
            return None
        try:
            token = read_token(rec.token_file) if rec.token_file else None
            with httpx.Client(timeout=DEFAULT_PROBE_TIMEOUT_S, trust_env=False) as http:
                resp = http.get(
                    f"{rec.url}/metrics",
                    headers={"Authorization": f"Bearer {token}"} if token else {},
                )
            resp.raise_for_status()
        except (httpx.HTTPError, AimassError):
            return None
        if self.engine(rec) == "vllm":
            # The gauges say what the engine holds at this instant; one scrape can miss a
            # load (requests between two steps, or still in vLLM's API server when the node
            # is busy). The mean in flight since the last scrape cannot, but it only counts
            # finished requests. The larger of the two, so that neither a dip of the gauge
            # nor a long generation hides a load.
            now_in = vllm_ongoing(resp.text)
            mean = self._mean_in_flight(rec, vllm_busy_seconds(resp.text))
            known = [x for x in (now_in, mean) if x is not None]
            return max(known) if known else None
        match = _BUSY.search(resp.text)
        return self._mean_in_flight(rec, float(match.group(1)) if match else 0.0)

    def _mean_in_flight(self, rec: EndpointRecord, busy_s: float | None) -> float | None:
        """Little's law: the growth of ``busy_s`` (seconds spent by finished requests) since
        this replica's previous scrape, per second; None on the first scrape."""
        if busy_s is None:
            return None
        now = time.monotonic()
        before = self.busy.get(rec.key)
        self.busy[rec.key] = (now, busy_s)
        if before is None or now <= before[0]:
            return None
        return max(0.0, (busy_s - before[1]) / (now - before[0]))

    # -- actions ---------------------------------------------------------------------------
    def _fence(self, rec: EndpointRecord, why: str, *, bad: bool = True) -> dict[str, Any]:
        """Take ``rec`` out of service for good: FAILED + fenced (clients never use it), and
        its job cancelled if it is still there."""
        assert self.scheduler is not None
        if bad:
            write_record(
                rec, EndpointState.FAILED, fenced=f"supervisor: {why}",
                message=f"supervisor: {why}",
            )  # fmt: skip
        else:  # a healthy replica drains (DRAINING -> STOPPED) on the scancel below
            write_record(rec, message=f"supervisor: {why}")
        self.fails.pop(rec.key, None)
        self.probes.pop(rec.key, None)
        with contextlib.suppress(SchedulerError, NotFoundError):
            self.scheduler.cancel([rec.job_id])
        return self._decide(
            "fence" if bad else "retire", why,
            replica=rec.replica, job_id=rec.job_id,
        )  # fmt: skip

    def _replace(self, index: int, model: str | None) -> dict[str, Any]:
        """Submit a new job for replica ``index`` (array task of the run dir's ``job.sh``)."""
        assert self.scheduler is not None
        script = self.run_dir / "job.sh"
        try:
            base = self.scheduler.submit(
                script, run_dir=self.run_dir, extra_args=[f"--array={index}"]
            )
        except AimassError as exc:
            return self._decide("replace-failed", f"sbatch: {exc}", replica=index)
        job_id = f"{base}_{index}"
        records = read_records(self.run_dir)
        template = records[-1] if records else None
        write_record(
            EndpointRecord(
                model_ref=model or (template.model_ref if template else "?"),
                model_name=template.model_name if template else "?",
                version=None,
                state=EndpointState.PENDING,
                job_id=job_id,
                replica=index,
                run_dir=str(self.run_dir),
                token_file=template.token_file if template else None,
                engine=template.engine if template else None,
            ),
            message="submitted by the supervisor",
        )
        self.replaced += 1
        before = [r for r in records if r.replica == index and r.job_id != job_id]
        last = before[-1] if before else None
        why = f"replica {index} has no live job" + (
            f" ({last.job_id} {last.state}{': ' + last.message if last.message else ''})"
            if last is not None
            else ""
        )
        return self._decide(
            "replace", why, replica=index, new_job_id=job_id,
            old_job_id=last.job_id if last else None,
        )  # fmt: skip

    # -- the loop --------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Update ``supervisor.json`` (keeps what ``serve start`` wrote there)."""
        doc = read_supervisor(self.run_dir) or {}
        doc.update(
            heartbeat=now_iso(), pid=os.getpid(), node=socket.gethostname(),
            replaced=self.replaced, slurm_job=os.environ.get("SLURM_JOB_ID"),
            holder=self.me["ident"], restart=self.me["restart"],
        )  # fmt: skip
        atomic_write_json(self.run_dir / SUPERVISOR_FILE, doc)

    def hold(self, settings: Settings) -> bool:
        """Renew or take the lease; True when this supervisor may act this round. A change
        is a decision: ``lease-acquired``, ``lease-lost``, ``standby`` (once per holder)."""
        assert self.lease is not None
        self.lease.ttl_s = lease_ttl(settings.interval_s)
        try:
            held, doc = self.lease.acquire()
        except OSError as exc:  # the run directory cannot be read or written: act on nothing
            if self._standby_for != f"error: {exc}":
                with contextlib.suppress(OSError):
                    self._decide("lease-failed", f"{type(exc).__name__}: {exc}")
                self._standby_for = f"error: {exc}"
            self._holding = False
            return False
        if held:
            if not self._holding:
                self._decide(
                    "lease-acquired", f"took the lease ({(doc or {}).get('why')})",
                    generation=self.lease.generation, took_over=(doc or {}).get("took_over"),
                )  # fmt: skip
            self._holding, self._standby_for = True, None
            return True
        holder = _holder(doc) or "another supervisor"
        if self._holding:
            self._decide("lease-lost", f"supervisor {holder} holds the lease now", holder=holder)
        self._holding = False
        if holder != self._standby_for:
            self._decide("standby", f"supervisor {holder} holds the lease", holder=holder)
            self._standby_for = holder
        return False

    def run(self, *, max_rounds: int | None = None) -> int:
        """Supervise until the service is stopped or a signal arrives; the exit code. Only
        the lease holder acts (and heartbeats); another supervisor waits on standby."""
        assert self.lease is not None
        warn = self._install_signals()
        self._decide("supervisor-up", "started", pid=os.getpid())
        self._warn_at = self._warning_due_at()
        rounds = 0
        try:
            while self._stop is None:
                desired = read_desired(self.run_dir)
                if stop_requested(self.run_dir) or (desired or {}).get("state") != "running":
                    self._decide("supervisor-exit", "the service is stopping")
                    return 0
                settings = Settings.from_desired(desired)
                if self.hold(settings):
                    try:
                        self.tick()
                    except AimassError as exc:  # one bad round is no reason to stop
                        self._decide("round-failed", str(exc))
                    self.heartbeat()
                rounds += 1
                if max_rounds is not None and rounds >= max_rounds:
                    return 0
                deadline = time.monotonic() + settings.interval_s
                while self._stop is None and time.monotonic() < deadline:
                    if self._warn_at is not None and time.monotonic() >= self._warn_at:
                        self._stop = warn  # the warning is due and did not come (yet)
                        self._warn_why = self._warn_why or "the time left"
                    time.sleep(0.1)
            if self._stop == warn:
                self._requeue_self()
            return 0
        finally:
            self.lease.release()  # a successor (the requeued job, a standby) acts at once

    def _warning_due_at(self) -> float | None:
        """When this job's time-limit warning is due (Slurm's time left less the site's
        grace), so that a warning sent late, or before the handler listened, still requeues
        the job; None outside a supervisor job or without a limit."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job or not os.environ.get("AIMASS_SERVICE_SUPERVISOR"):
            return None
        left = time_left(job)
        if left is None:
            return None
        grace = self.site.preemption.grace_seconds
        self._warn_why = f"{left}s left at start, grace {grace}s"
        return time.monotonic() + left - grace

    def _install_signals(self) -> str | None:
        try:
            warn: str | None = str(parse_signal(self.site.preemption.signal))
        except ValueError:
            warn = None
        numbers = {signal.SIGTERM, signal.SIGINT}
        if warn is not None:
            numbers.add(signal.Signals(int(warn)))
        for sig in numbers:
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._on_signal)
        return warn

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stop is None:
            self._stop = str(signum)
            self._warn_why = f"signal {signal.Signals(signum).name}"

    def _requeue_self(self) -> None:
        """Warned of the time limit: hand the lease over and requeue this job; its next run
        takes the lease and resumes from the run directory (desired state, records)."""
        assert self.scheduler is not None and self.lease is not None
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            return
        self.lease.release()  # before the requeue: it ends this process
        self._decide(
            "supervisor-requeued",
            f"time-limit warning ({self._warn_why}): the next run of this job takes the lease",
            job_id=job_id,
        )  # fmt: skip
        try:
            self.scheduler.requeue(job_id)
        except AimassError as exc:
            self._decide("supervisor-requeue-failed", str(exc), job_id=job_id)


def check_vllm(rec: EndpointRecord, url: str, auth: dict[str, str], timeout: float) -> str | None:
    """A vLLM replica's check: ``/readyz`` (vLLM's ``/health``, 503 while draining) and a real
    one-token completion for the served model name; None when both pass, else why."""
    body = {"model": rec.model_name, "prompt": "x", "max_tokens": 1}
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as http:
            resp = http.get(f"{url}/readyz")
            if resp.status_code != 200:
                return f"/readyz answered {resp.status_code}"
            resp = http.post(f"{url}/v1/completions", json=body, headers=auth)
            if resp.status_code != 200:
                return f"probe completion answered {resp.status_code}: {resp.text[:120]}"
            if not resp.json().get("choices"):
                return "probe completion answered no choices"
    except httpx.TimeoutException:
        return f"no answer within {timeout:g}s (hung?)"
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    return None


def live_model(desired: dict[str, Any]) -> str | None:
    """The model the desired state names."""
    model = desired.get("model")
    return str(model) if model else None


def _state(rec: EndpointRecord) -> EndpointState:
    try:
        return EndpointState(rec.state)
    except ValueError:
        return EndpointState.FAILED


def _age_s(started: str) -> float | None:
    from datetime import UTC, datetime

    try:
        then = datetime.fromisoformat(started)
    except ValueError:
        return None
    return (datetime.now(UTC) - then).total_seconds()


def build_parser() -> argparse.ArgumentParser:
    """``python -m aimass_hpc.launch.service_supervisor --help``."""
    p = argparse.ArgumentParser(
        prog="python -m aimass_hpc.launch.service_supervisor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="the service's run directory")
    p.add_argument("--site", help="site name or file (default: $AIMASS_SITE)")
    p.add_argument("--rounds", type=int, help="stop after N rounds (tests)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; one line on stderr and exit code 2-6 for an aimass error."""
    args = build_parser().parse_args(argv)
    try:
        site = load_site(args.site)
        run_dir = args.run_dir.resolve()
        if not (run_dir / "job.sh").is_file():
            raise NotFoundError(f"{run_dir}: not a service run directory (no job.sh)")
        return Supervisor(site, run_dir).run(max_rounds=args.rounds)
    except AimassError as exc:
        print(f"aimass supervisor: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
