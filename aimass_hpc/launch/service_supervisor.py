"""The service supervisor: keeps a service at its desired state (``aimass serve --supervise``).

A small CPU batch job, started beside the replicas, running::

    python -m aimass_hpc.launch.service_supervisor RUN_DIR [--site SITE]

It is login-side code (like the search driver's ``--detach`` job): it reads the service's
``desired.json`` (model, replicas, check settings; written atomically by ``aimass serve`` and
changed by ``serve stop``/``upgrade``) and every ``interval`` seconds

* asks the scheduler, in one call, about every live replica's job;
* checks every READY replica: ``GET /healthz`` and a real ``POST /v1/predict`` on a probe input
  of the model's input shape and dtype (from ``GET /v1/models``, i.e. the model's recipe);
* replaces a replica whose job ended, that has been LOADING too long (hung while loading), or
  that failed its checks ``failures`` times in a row: the old record is *fenced* (FAILED with
  the reason; a replica that wakes up later cannot set it READY again), its job is cancelled if
  still there, and a new job for the same array task is submitted from the run directory's own
  ``job.sh`` (what ``serve start`` queued; a handover does the same) with a PENDING record;
* stops replicas above the desired count.

A replica whose job is queued (PENDING) counts as coming, not missing. Every decision goes to
``decisions.jsonl`` (append-only) with its reason; ``supervisor.json`` holds a heartbeat.
``serve.stop`` in the run directory (``aimass serve stop``) or a desired state other than
``running`` ends the supervisor without touching anything. On the site's warning signal
before its time limit the job requeues itself and carries on where it was.
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
from aimass_hpc.common.fsutil import atomic_write_json
from aimass_hpc.common.slurm_cli import parse_signal
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
_LIVE = {EndpointState.PENDING, EndpointState.LOADING, EndpointState.READY}
# Seconds spent answering predict requests so far (serve/metrics.py's latency histogram).
_BUSY = re.compile(
    r'^aimass_serve_request_duration_seconds_sum\{route="/v1/predict"\} ([0-9.eE+-]+)$',
    re.MULTILINE,
)


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
    _stop: str | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.scheduler is None:
            self.scheduler = get_scheduler(self.site)

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
        record_decision(
            self.run_dir, "check-failed", problem, replica=rec.replica, job_id=rec.job_id,
            count=count, limit=settings.failures,
        )  # fmt: skip
        if count >= settings.failures:
            return f"failed {count} checks in a row (last: {problem})"
        return None

    def check(self, rec: EndpointRecord, timeout: float) -> str | None:
        """Readiness and a real predict on a probe input; None when both pass, else why."""
        url = rec.url
        if url is None:
            return "READY without an address"
        try:
            token = read_token(rec.token_file) if rec.token_file else None
        except AimassError as exc:
            return f"token: {exc}"
        auth = {"Authorization": f"Bearer {token}"} if token else {}
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
        over the time between two scrapes of ``/metrics`` (Little's law). The replica count
        is what is live -- PENDING (queued) replicas count as coming, not as missing.
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
        return record_decision(
            self.run_dir, f"scale-{direction}", why, to=want, ongoing=round(ongoing, 3)
        )

    def _ongoing(self, rec: EndpointRecord) -> float | None:
        """Mean predict requests in flight at ``rec`` since the previous scrape (None: first
        scrape, or /metrics did not answer)."""
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
        match = _BUSY.search(resp.text)
        busy = float(match.group(1)) if match else 0.0
        now = time.monotonic()
        before = self.busy.get(rec.key)
        self.busy[rec.key] = (now, busy)
        if before is None or now <= before[0]:
            return None
        return max(0.0, (busy - before[1]) / (now - before[0]))

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
        return record_decision(
            self.run_dir, "fence" if bad else "retire", why,
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
            return record_decision(self.run_dir, "replace-failed", f"sbatch: {exc}", replica=index)
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
        return record_decision(
            self.run_dir, "replace", why, replica=index, new_job_id=job_id,
            old_job_id=last.job_id if last else None,
        )  # fmt: skip

    # -- the loop --------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Update ``supervisor.json`` (keeps what ``serve start`` wrote there)."""
        doc = read_supervisor(self.run_dir) or {}
        doc.update(
            heartbeat=now_iso(), pid=os.getpid(), node=socket.gethostname(),
            replaced=self.replaced, slurm_job=os.environ.get("SLURM_JOB_ID"),
        )  # fmt: skip
        atomic_write_json(self.run_dir / SUPERVISOR_FILE, doc)

    def run(self, *, max_rounds: int | None = None) -> int:
        """Supervise until the service is stopped or a signal arrives; the exit code."""
        warn = self._install_signals()
        record_decision(self.run_dir, "supervisor-up", "started", pid=os.getpid())
        rounds = 0
        while self._stop is None:
            desired = read_desired(self.run_dir)
            if stop_requested(self.run_dir) or (desired or {}).get("state") != "running":
                record_decision(self.run_dir, "supervisor-exit", "the service is stopping")
                return 0
            try:
                self.tick()
            except AimassError as exc:  # one bad round is no reason to stop supervising
                record_decision(self.run_dir, "round-failed", str(exc))
            self.heartbeat()
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                return 0
            deadline = time.monotonic() + Settings.from_desired(desired).interval_s
            while self._stop is None and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._stop == warn:
            self._requeue_self()
        return 0

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
        self._stop = str(signum)

    def _requeue_self(self) -> None:
        """Warned of the time limit: requeue this job; it resumes from the run directory."""
        assert self.scheduler is not None
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            return
        try:
            self.scheduler.requeue(job_id)
            record_decision(self.run_dir, "supervisor-requeued", "time limit", job_id=job_id)
        except AimassError as exc:
            record_decision(self.run_dir, "supervisor-requeue-failed", str(exc), job_id=job_id)


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
