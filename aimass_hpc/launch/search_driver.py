"""The search driver: runs an ask/tell sampler's trials as batch jobs, asynchronously.

It keeps at most ``parallel`` trials in the scheduler; as soon as one ends it tells the sampler
and asks for the next while the others are still running (no lock-step rounds). All running
trials are polled with ONE scheduler ``status`` call per poll. It knows no Slurm: it talks to
the scheduler interface and :func:`aimass_hpc.launch.submit.submit`.

Crash safety: every decision is journaled *before* it is acted on::

    ask -> journal trial_proposed -> submit -> journal trial_submitted(job id) -> ...
    job ended -> journal trial_finished/failed -> tell the sampler

so a kill between any two steps leaves a journal from which :meth:`SearchDriver.run` (what
``aimass search resume`` calls) continues: it replays the journal, rebuilds the sampler
(deterministic given the seed and the records), then reconciles the trials that were active
with the scheduler: finished ones are read, running ones adopted, proposed-but-unsubmitted ones
submitted (or adopted when their job was queued just before the kill), lost ones resubmitted
under the same trial id. A trial id is never duplicated and the search ends at exactly the
budget. One driver at a time: a lock file with a heartbeat in the search directory.

A trial whose job may have run is never resubmitted on "unknown". The trial's run directory
outranks the scheduler: a ``result.json`` is the trial's result, and its logs (the batch
script's ``aimass: job N restart`` header, Slurm's ``slurm-N.out``) prove its job started. A
scheduler that cannot answer (squeue failing, or the job gone from squeue and sacct failing)
means waiting, said once; a trial is lost (and resubmitted) only when the scheduler answers
that it knows no such job AND the run directory shows no sign of a start.

Search directory layout::

    <search dir>/
      journal.jsonl      the append-only journal (the whole state)
      spec.toml          the spec as given (for humans; the journal holds the resolved one)
      driver.lock        held by the live driver (host, pid; heartbeat by mtime)
      trials/            one run directory per trial submission (params.json inside)
      driver/            the driver's own run directory when started with --detach
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimass_hpc.common import fsutil
from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError
from aimass_hpc.common.slurm_cli import parse_signal, signal_name
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.search_spec import (
    SearchSpec,
    format_command,
    placeholder_values,
    spec_from_record,
    train_overrides,
)
from aimass_hpc.config.site import Site
from aimass_hpc.hpo.pruning import History, SuccessiveHalving, read_history
from aimass_hpc.hpo.samplers import Sampler
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.journal import FileLock, Journal, SearchState, TrialRecord
from aimass_hpc.launch.runs import RunDir
from aimass_hpc.launch.scheduler.base import AccountingUnavailable
from aimass_hpc.runtime.result import RESULT_FILE  # written by report_result / write_result

log = logging.getLogger(__name__)

SEARCHES_DIR = "searches"
TRIALS_DIR = "trials"
DRIVER_DIR = "driver"
DRIVER_LOCK = "driver.lock"
SPEC_COPY = "spec.toml"
PARAMS_FILE = "params.json"

# A driver refreshes its lock every poll; one silent this long (another host) is dead.
DRIVER_STALE_S = 120.0
# Polls in a row a job may be missing from the scheduler before its trial counts as lost.
MISSES_BEFORE_LOST = 3
SUBMIT_ATTEMPTS = 3  # scheduler errors in a row before a trial's submission is given up


def make_sampler(spec: SearchSpec, seed: int) -> Sampler:
    """The sampler the spec names, seeded with the journaled seed."""
    from aimass_hpc.hpo import make_sampler as by_name

    return by_name(
        spec.search.sampler, spec.space_obj(), seed=seed, direction=spec.search.direction
    )


def sampler_records(state: SearchState) -> list[tuple[int, dict[str, Any], str, float | None]]:
    """The journal as the sampler's ``replay`` wants it: ``(id, params, state, value)``.

    Pruned and cancelled trials count as failures (a region to avoid, not a result).
    """
    out: list[tuple[int, dict[str, Any], str, float | None]] = []
    for t in state.trials.values():
        if t.state == J.FINISHED and t.value is not None and math.isfinite(t.value):
            out.append((t.id, t.params, "complete", float(t.value)))
        elif t.terminal:
            out.append((t.id, t.params, "failed", None))
        else:
            out.append((t.id, t.params, "pending", None))
    return out


# ---------------------------------------------------------------------------------------------
# The search directory


@dataclass(frozen=True)
class SearchDir:
    """A search directory on the shared filesystem."""

    path: Path

    @property
    def journal_path(self) -> Path:
        return self.path / J.JOURNAL_NAME

    @property
    def trials_root(self) -> Path:
        return self.path / TRIALS_DIR

    @property
    def driver_root(self) -> Path:
        return self.path / DRIVER_DIR

    @property
    def lock_path(self) -> Path:
        return self.path / DRIVER_LOCK

    def journal(self) -> Journal:
        """A journal handle (cheap; it reads incrementally)."""
        return Journal(self.journal_path)

    def state(self) -> SearchState:
        """The search state replayed from the journal (a fresh read; a long-lived reader
        keeps a :class:`Journal` and calls its ``state()``, which reads only what is new)."""
        return self.journal().state()

    def spec(self, state: SearchState | None = None) -> SearchSpec:
        """The resolved spec the search was created with."""
        state = state or self.state()
        if state.spec is None:
            raise NotFoundError(f"{self.path}: the journal has no search_created record")
        return spec_from_record(state.spec)

    def site_ref(self) -> str | None:
        """The site the search was created for (from the journal)."""
        for rec in self.journal().records():
            if rec.get("type") == J.SEARCH_CREATED:
                return rec.get("site")
        return None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SearchDir:
        """An existing search directory; ``NotFoundError`` when it holds no journal."""
        sdir = cls(Path(path).expanduser().resolve())
        if not sdir.journal_path.is_file():
            raise NotFoundError(f"no search journal in {sdir.path} (give a search directory)")
        return sdir


def create_search(
    spec: SearchSpec,
    site: Site,
    *,
    directory: str | os.PathLike[str] | None = None,
    spec_text: str | None = None,
) -> SearchDir:
    """Create a search directory and its journal (``search_created``); submits nothing.

    The seed is fixed here (a random one when the spec has none) and journaled, so a resumed
    driver proposes exactly what the first would have.
    """
    if directory is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory = (
            site.runs_root / SEARCHES_DIR / f"{stamp}-{spec.search.name}-{secrets.token_hex(3)}"
        )
    path = Path(directory).expanduser().resolve()
    if path.exists() and any(path.iterdir()):
        raise ConflictError(f"search directory {path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    (path / TRIALS_DIR).mkdir(exist_ok=True)
    record = spec.to_record()
    if record["search"]["seed"] is None:
        record["search"]["seed"] = secrets.randbits(31)
    if spec_text is not None:
        fsutil.atomic_write_text(path / SPEC_COPY, spec_text)
    sdir = SearchDir(path)
    sdir.journal().append(
        J.SEARCH_CREATED,
        spec=record,
        name=spec.search.name,
        site=site.ref(),
        host=socket.gethostname(),
        user=os.environ.get("USER", ""),
    )
    return sdir


# ---------------------------------------------------------------------------------------------
# Trial results


def read_trial_value(
    run_dir: str | os.PathLike[str], metric: str, objective: str
) -> tuple[Any, str]:
    """The value a finished trial reported, and where it was found.

    Looked up in order: ``result.json`` (the runtime API: ``metrics[metric]``, or ``value``);
    then for a command the last line of its output that parses as a number, for a training
    spec the last ``metric`` in ``metrics.jsonl`` (and the other as a fallback).
    Returns ``(None, "")`` when the trial reported nothing.
    """
    run = RunDir(Path(run_dir))
    result = run.path / RESULT_FILE
    if result.is_file():
        try:
            data = fsutil.read_json(result)
        except (OSError, ValueError):
            data = {}
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        for source in (metrics, data):
            for key in (metric, "value"):
                value = source.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return float(value), f"{RESULT_FILE}:{key}"
    readers = (
        [_last_number_line, _last_metric]
        if objective == "command"
        else [
            _last_metric,
            _last_number_line,
        ]
    )
    for reader in readers:
        found = reader(run, metric)
        if found[0] is not None:
            return found
    return None, ""


def _last_number_line(run: RunDir, metric: str) -> tuple[float | None, str]:
    logs = run.log_files()
    for path in reversed(logs):  # the latest restart first
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            text = line.strip()
            if not text:
                continue
            try:
                return float(text), f"output ({path.name})"
            except ValueError:
                continue
    return None, ""


def _last_metric(run: RunDir, metric: str) -> tuple[float | None, str]:
    history = read_history(run.path, metric)
    if history:
        return history[-1][1], f"metrics.jsonl:{metric}"
    return None, ""


def _log_tail(run_dir: str | None, lines: int = 1) -> str:
    """The last non-empty output line of a trial (for a failure reason)."""
    if not run_dir:
        return ""
    files = RunDir(Path(run_dir)).log_files()
    if not files:
        return ""
    try:
        text = files[-1].read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    tail = [t.strip() for t in text if t.strip()][-lines:]
    return " | ".join(tail)[:200]


# What the job scripts print first in every restart log (job_templates/job.j2), and the name
# of Slurm's own output file (``#SBATCH --output=logs/slurm-%j.out``).
_LOG_HEADER_RE = re.compile(r"aimass: job ([0-9]+)[_0-9]* restart ")
_BATCH_LOG_RE = re.compile(r"slurm-([0-9]+)(?:_[0-9]+)?\.out")


@dataclass(frozen=True)
class RunEvidence:
    """What a trial's run directory itself says about its job (whatever the scheduler says)."""

    started: bool  # some job wrote logs here: it ran
    job_ids: tuple[str, ...] = ()  # the ids those logs name, oldest first

    @property
    def job_id(self) -> str | None:
        """The newest job id the logs name."""
        return self.job_ids[-1] if self.job_ids else None


def run_evidence(run_dir: str | os.PathLike[str] | None) -> RunEvidence:
    """Whether a job started in ``run_dir`` and which job ids its logs name."""
    if not run_dir:
        return RunEvidence(False)
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        return RunEvidence(False)
    logs, batch = run.log_files(), run.batch_logs()
    ids: list[str] = []
    for path in batch:
        match = _BATCH_LOG_RE.fullmatch(path.name)
        if match and match.group(1) not in ids:
            ids.append(match.group(1))
    for path in logs:
        match = _LOG_HEADER_RE.match(_first_line(path))
        if match and match.group(1) not in ids:
            ids.append(match.group(1))
    return RunEvidence(bool(logs or batch), tuple(ids))


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline(500)
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# The driver


class SearchDriver:
    """Drives one search directory until its budget is spent (or it is cancelled).

    ``scheduler``: a backend (default: the site's); ``echo``: receives one line per event
    (progress display); ``poll_interval`` overrides the spec's.
    """

    def __init__(
        self,
        sdir: SearchDir,
        site: Site,
        *,
        scheduler: Any = None,
        echo: Callable[[str], None] | None = None,
        poll_interval: float | None = None,
    ) -> None:
        self.sdir = sdir
        self.site = site
        self.journal = sdir.journal()
        state = self.journal.state()
        self.spec = sdir.spec(state)
        self.seed = int(self.spec.search.seed or 0)
        if scheduler is None:
            from aimass_hpc.launch.scheduler import get_scheduler

            scheduler = get_scheduler(site)
        self.scheduler = scheduler
        self.echo = echo or (lambda _msg: None)
        self.poll_interval = poll_interval or self.spec.search.poll_interval
        self.lock = FileLock(sdir.lock_path, stale_after=DRIVER_STALE_S, purpose="search driver")
        self.sampler: Sampler | None = None
        self.pruner = (
            SuccessiveHalving(
                min_step=self.spec.pruning.min_step,
                reduction_factor=self.spec.pruning.reduction_factor,
                direction=self.spec.search.direction,
                min_trials=self.spec.pruning.min_trials,
            )
            if self.spec.pruning.enabled
            else None
        )
        self._misses: dict[int, int] = {}
        self._waiting: dict[int, str] = {}  # trial -> why it waits on the scheduler (said once)
        self._poll_error: str | None = None  # the last failed poll's error (said once)
        self._submit_errors: dict[int, int] = {}
        self._histories: dict[int, History] = {}
        self._stop_signal: str | None = None
        self.polls = 0  # scheduler status calls made (one per poll, whatever the trial count)
        self._last_beat = 0.0

    # ------------------------------------------------------------------------- public

    def state(self) -> SearchState:
        """The current state: the driver's one :class:`SearchState`, brought up to date with
        the records appended since the last call (by this driver, ``aimass search cancel``,
        anyone). Cheap: no new bytes, no parsing; the same object every time, updated in
        place, so a poll's cost does not grow with the number of trials."""
        return self.journal.state()

    def run(self) -> SearchState:
        """Run (or resume) the search to its end; returns the final state.

        Raises ``ConflictError`` when another live driver holds the search.
        """
        self._take_lock()
        previous = self._install_signals()
        try:
            state = self.state()
            if state.finished:
                self.echo("search already finished")
                return state
            self.sampler = make_sampler(self.spec, self.seed)
            self.sampler.replay(sampler_records(state))
            self.journal.append(
                J.DRIVER_STARTED,
                host=socket.gethostname(),
                pid=os.getpid(),
                job_id=os.environ.get("SLURM_JOB_ID"),
                resumed=bool(state.trials),
            )
            if state.trials:
                done = sum(t.terminal for t in state.trials.values())
                self.echo(
                    f"resuming: {state.n_proposed} trials proposed, {done} ended, "
                    f"{len(state.active)} to reconcile with the scheduler"
                )
            return self._loop()
        finally:
            self._restore_signals(previous)
            self.lock.release()

    # ------------------------------------------------------------------------- loop

    def _loop(self) -> SearchState:
        budget, parallel = self.spec.search.budget, self.spec.search.parallel
        # Each self.state() below is the same SearchState, caught up with what the previous
        # step journaled: it applies the new records only (issue 11: no full replay per step).
        while True:
            self._heartbeat(force=True)
            state = self.state()
            if state.cancel_requested:
                self._cancel_active(state, "search cancelled")
                return self._finish(cancelled=True)
            if self._stop_signal is not None:
                self.echo(
                    f"driver stopping on {self._stop_signal}; `aimass search resume` continues"
                )
                self._maybe_requeue_self()
                return state
            self._poll(state)
            self._reconcile(self.state())
            if self.pruner is not None:
                self._prune(self.state())
            self._fill(self.state(), budget, parallel)
            state = self.state()
            if not state.active and state.n_proposed >= budget:
                return self._finish(cancelled=False)
            self._sleep(self.poll_interval)

    def _heartbeat(self, force: bool = False) -> None:
        """Touch the driver lock (at least every few seconds, also between slow submissions)."""
        now = time.monotonic()
        if force or now - self._last_beat > 5.0:
            self.lock.refresh()
            self._last_beat = now

    @property
    def stopped_by(self) -> str | None:
        """The signal that stopped the driver early, if any (the search goes on at resume)."""
        return self._stop_signal

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    # ------------------------------------------------------------------------- proposing

    def _fill(self, state: SearchState, budget: int, parallel: int) -> None:
        """Ask for new trials until ``parallel`` are active or the budget is proposed."""
        assert self.sampler is not None
        active, proposed = len(state.active), state.n_proposed
        while active < parallel and proposed < budget:
            (trial,) = self.sampler.ask(1)
            J.ensure_new_trial_id(state, trial.id)
            self.journal.append(J.TRIAL_PROPOSED, trial=trial.id, params=trial.params)
            self.echo(f"trial {trial.id} proposed: {_fmt_params(trial.params)}")
            self._submit(trial.id, trial.params, attempt=1)
            active += 1
            proposed += 1

    def _submit(self, trial_id: int, params: dict[str, Any], *, attempt: int) -> None:
        from aimass_hpc.launch.submit import SubmitUnknown, submit

        self._heartbeat()
        try:
            request, files = build_trial(self.spec, self.site, self.sdir, trial_id, params)
        except InputError as exc:
            # These params make no valid job (e.g. a batch size the ranks cannot split): the
            # trial fails, the search goes on.
            self._end(trial_id, J.TRIAL_FAILED, reason=f"cannot build the trial's job: {exc}")
            return
        try:
            sub = submit(
                self.site,
                request,
                spec=trial_payload(self.spec, self.sdir, trial_id, params, attempt),
                files=files,
                runs_root=self.sdir.trials_root,
                scheduler=self.scheduler,
            )
        except SchedulerError as exc:
            n = self._submit_errors.get(trial_id, 0) + 1
            self._submit_errors[trial_id] = n
            if n >= SUBMIT_ATTEMPTS:
                self._end(trial_id, J.TRIAL_FAILED, reason=f"submission failed {n} times: {exc}")
            elif isinstance(exc, SubmitUnknown):
                self.echo(
                    f"trial {trial_id}: submission uncertain ({exc}); "
                    "looking for its job again next poll before any new submission"
                )
            else:
                self.echo(f"trial {trial_id}: submission failed ({exc}); retrying next poll")
            return
        if sub.note:
            self.echo(f"trial {trial_id}: {sub.note}")
        self._submit_errors.pop(trial_id, None)
        run_dir = str(getattr(sub.run_dir, "path", sub.run_dir))
        self.journal.append(
            J.TRIAL_SUBMITTED,
            trial=trial_id,
            job_id=str(sub.job_id),
            run_dir=run_dir,
            attempt=attempt,
        )
        again = f" (attempt {attempt})" if attempt > 1 else ""
        self.echo(f"trial {trial_id} submitted as job {sub.job_id}{again}")

    # ------------------------------------------------------------------------- watching

    def _poll(self, state: SearchState) -> None:
        """One scheduler call for every trial with a job; act on what ended."""
        from aimass_hpc.common.slurm_states import JobState

        watched = state.by_state(J.SUBMITTED, J.RUNNING)
        if not watched:
            return
        self.polls += 1
        try:
            statuses = self.scheduler.status([t.job_id for t in watched])
        except SchedulerError as exc:
            if str(exc) != self._poll_error:
                self.echo(f"status poll failed ({exc}); waiting for the scheduler, retrying")
            self._poll_error = str(exc)
            return
        if self._poll_error is not None:
            self.echo("the scheduler answers again")
            self._poll_error = None
        for t in watched:
            st = statuses.get(str(t.job_id))
            if st is None or st.state is JobState.UNKNOWN:
                self._missing(t, st)
                continue
            self._misses.pop(t.id, None)
            self._stop_waiting(t)
            if not st.is_terminal:
                if t.state == J.SUBMITTED and st.state in (JobState.RUNNING, JobState.COMPLETING):
                    started = time.time() - float(st.elapsed or 0)
                    self.journal.append(
                        J.TRIAL_RUNNING, trial=t.id, job_id=t.job_id, started_at=started
                    )
                continue
            self._job_ended(t, st)

    def _job_ended(self, t: TrialRecord, st: Any) -> None:
        from aimass_hpc.common.slurm_states import JobState

        started = t.started_at
        if started is None and st.elapsed is not None:
            started = time.time() - float(st.elapsed)
        if st.state is JobState.COMPLETED:
            self._collect(t, started)
        elif st.state in (JobState.PREEMPTED, JobState.NODE_FAIL, JobState.BOOT_FAIL):
            self._lose(t, f"job {t.job_id} ended {st.state.value} without being requeued")
        else:
            code = f" (exit code {st.exit_code})" if st.exit_code not in (None, 0) else ""
            tail = _log_tail(t.run_dir)
            reason = f"job {t.job_id} {st.state.value}{code}" + (f": {tail}" if tail else "")
            self._end(t.id, J.TRIAL_FAILED, reason=reason, started_at=started)

    def _collect(self, t: TrialRecord, started: float | None) -> None:
        """Read a completed trial's value: finished, or failed when it reported none."""
        metric = self.spec.search.metric
        value, source = (None, "")
        if t.run_dir:
            value, source = read_trial_value(t.run_dir, metric, self.spec.objective.kind)
        if value is None:
            self._end(
                t.id,
                J.TRIAL_FAILED,
                reason=f"job {t.job_id} completed but reported no value for {metric!r} "
                "(no result.json entry and no numeric last output line)",
                started_at=started,
            )
        elif not math.isfinite(value):
            self._end(
                t.id, J.TRIAL_FAILED, reason=f"objective value is {value}", started_at=started
            )
        else:
            self._end(t.id, J.TRIAL_FINISHED, value=value, source=source, started_at=started)

    def _missing(self, t: TrialRecord, st: Any) -> None:
        """A job the scheduler gives no state for: the run directory first (result.json, then
        the job script's exit record), then wait or lose.

        Only a job that every scheduler command answered it does not know, whose run
        directory shows no start, is lost (and so resubmitted); one that started and is
        known nowhere fails with the reason; one the scheduler cannot answer for is waited on.
        """
        if t.run_dir:
            value, source = read_trial_value(t.run_dir, self.spec.search.metric, "result-only")
            if value is not None and source.startswith(RESULT_FILE):
                self._stop_waiting(t)
                self._collect(t, t.started_at)
                return
            ended = RunDir(Path(t.run_dir)).exit_record()
            if ended is not None and str(ended.get("job_id")) in ("", str(t.job_id)):
                self._stop_waiting(t)
                self._misses.pop(t.id, None)
                if ended["exit_code"] == 0:
                    self._collect(t, t.started_at)
                else:
                    self._end(
                        t.id,
                        J.TRIAL_FAILED,
                        reason=f"job {t.job_id} exited with code {ended['exit_code']} "
                        "(its exit record; the scheduler no longer lists it)",
                        started_at=t.started_at,
                    )
                return
        if st is not None and st.lookup_failed:
            self._misses.pop(t.id, None)
            self._wait_for_scheduler(
                t,
                f"job {t.job_id} has left the queue and the scheduler cannot say how it ended "
                f"({st.reason})",
            )
            return
        if st is not None and st.source:  # listed, in a state string we do not know
            self._wait_for_scheduler(
                t, f"job {t.job_id} is in a state aimass does not know ({st.raw_state or '?'})"
            )
            return
        n = self._misses.get(t.id, 0) + 1
        self._misses[t.id] = n
        if n < MISSES_BEFORE_LOST:
            return
        self._misses.pop(t.id, None)
        self._stop_waiting(t)
        if run_evidence(t.run_dir).started:
            self._end(
                t.id,
                J.TRIAL_FAILED,
                reason=f"job {t.job_id} ran (its run directory has logs) but neither the "
                "scheduler nor the trial says how it ended (no result.json)",
            )
        else:
            self._lose(t, f"job {t.job_id} is unknown to the scheduler and never started")

    def _wait_for_scheduler(self, t: TrialRecord, why: str) -> None:
        """Keep ``t`` as it is until the scheduler can answer; say so once."""
        if self._waiting.get(t.id) != why:
            self.echo(f"trial {t.id}: {why}; waiting for the scheduler (not resubmitting)")
        self._waiting[t.id] = why

    def _stop_waiting(self, t: TrialRecord) -> None:
        if self._waiting.pop(t.id, None) is not None:
            self.echo(f"trial {t.id}: the scheduler answers again")

    def _lose(self, t: TrialRecord, reason: str) -> None:
        self.journal.append(J.TRIAL_LOST, trial=t.id, job_id=t.job_id, reason=reason)
        self.echo(f"trial {t.id} lost: {reason}")

    def _reconcile(self, state: SearchState) -> None:
        """Submit trials journaled as proposed or lost (after a crash or a lost job)."""
        for t in state.by_state(J.LOST):
            if t.attempts >= self.spec.search.max_attempts:
                self._end(t.id, J.TRIAL_FAILED, reason=f"lost {t.attempts} times; last: {t.reason}")
            else:
                self._submit(t.id, t.params, attempt=t.attempts + 1)
        for t in state.by_state(J.PROPOSED):
            if self._adopt_orphan(t, state) == "none":
                self._submit(t.id, t.params, attempt=t.attempts + 1)

    def _adopt_orphan(self, t: TrialRecord, state: SearchState) -> str:
        """A job queued for ``t`` but not journaled (a crash, or a submit that timed out).

        Returns ``"adopted"``, ``"wait"`` (the scheduler cannot say whether one was queued)
        or ``"none"`` (positive evidence nothing was: submit).
        """
        for entry in self._orphan_dirs(t, state):
            decision = self._adopt_from(t, entry)
            if decision != "none":
                return decision
        return "none"

    def _orphan_dirs(self, t: TrialRecord, state: SearchState) -> list[Path]:
        """Run directories made for trial ``t`` that the journal does not know."""
        known = {tr.run_dir for tr in state.trials.values() if tr.run_dir}
        root = self.sdir.trials_root
        if not root.is_dir():
            return []
        found = []
        for entry in sorted(root.iterdir()):
            if str(entry) in known or not (entry / PARAMS_FILE).is_file():
                continue
            try:
                payload = RunDir(entry).read_spec()
            except (OSError, ValueError):
                continue
            if _payload_trial(payload) == t.id:
                found.append(entry)
        return found

    def _adopt_from(self, t: TrialRecord, entry: Path) -> str:
        """Adopt the job of one orphan run directory if it has one (see :meth:`_adopt_orphan`)."""
        run = RunDir(entry)
        job_id = run.job_id or run_evidence(entry).job_id
        if not job_id:
            # Killed while sbatch ran (or it timed out): the job may be queued, id unrecorded.
            try:
                found = self.scheduler.find_jobs_for_run(entry)
            except AccountingUnavailable:
                found = []  # squeue answered: not queued; no logs in the run dir: never started
            except SchedulerError as exc:
                self._wait_for_scheduler(t, f"cannot tell whether its job was queued ({exc})")
                return "wait"
            if not found:
                return "none"
            job_id = found[-1]
        self._stop_waiting(t)
        if run.job_id != job_id:
            run.update_state(job_id=job_id, status="submitted", adopted=True)
        self.journal.append(
            J.TRIAL_SUBMITTED,
            trial=t.id,
            job_id=str(job_id),
            run_dir=str(entry),
            attempt=t.attempts + 1,
            adopted=True,
        )
        self.echo(f"trial {t.id}: adopted job {job_id} queued before the driver stopped")
        return "adopted"

    # ------------------------------------------------------------------------- pruning

    def _prune(self, state: SearchState) -> None:
        assert self.pruner is not None
        running = state.by_state(J.RUNNING)
        if not running:
            return
        metric = self.spec.pruning.metric or self.spec.search.metric
        histories: dict[int, History] = {}
        for t in state.trials.values():
            if not t.run_dir:
                continue
            if t.id in self._histories:
                histories[t.id] = self._histories[t.id]
                continue
            hist = read_history(t.run_dir, metric)
            if t.terminal:
                self._histories[t.id] = hist
            histories[t.id] = hist
        for t in running:
            decision = self.pruner.decide(t.id, histories)
            if decision is None:
                continue
            self._end(
                t.id,
                J.TRIAL_PRUNED,
                value=decision.value,
                step=decision.step,
                reason=decision.reason,
            )
            self._cancel_jobs([t.job_id])

    # ------------------------------------------------------------------------- endings

    def _end(self, trial_id: int, kind: str, **fields: Any) -> None:
        """Journal a trial's terminal record, then tell the sampler."""
        now = time.time()
        fields.setdefault("ended_at", now)
        self.journal.append(kind, trial=trial_id, **fields)
        value = fields.get("value")
        if self.sampler is not None:
            rec = next((r for r in self.sampler.records if r.id == trial_id), None)
            if rec is not None and rec.state == "pending":
                if kind == J.TRIAL_FINISHED:
                    self.sampler.tell(trial_id, value)
                else:
                    self.sampler.tell(trial_id, None, failed=True)
        best = self.state().best_trial(self.spec.search.direction)
        best_txt = f" (best: trial {best.id} = {best.value:.6g})" if best else ""
        if kind == J.TRIAL_FINISHED:
            self.echo(f"trial {trial_id} finished: {value:.6g}{best_txt}")
        else:
            what = kind.removeprefix("trial_")
            self.echo(f"trial {trial_id} {what}: {fields.get('reason', '')}{best_txt}")

    def _cancel_jobs(self, job_ids: list[str | None]) -> None:
        ids = [str(j) for j in job_ids if j]
        if not ids:
            return
        try:
            self.scheduler.cancel(ids)
            return
        except NotFoundError:
            if len(ids) == 1:
                return  # already gone
        except SchedulerError as exc:
            if len(ids) == 1:
                self.echo(f"cancel of job {ids[0]} failed: {exc}")
                return
        for job_id in ids:  # some gone or unanswerable: cancel the others one by one
            try:
                self.scheduler.cancel([job_id])
            except NotFoundError:
                continue
            except SchedulerError as exc:
                self.echo(f"cancel of job {job_id} failed: {exc}")

    def _cancel_active(self, state: SearchState, reason: str) -> None:
        active = state.active
        for t in active:
            self._end(t.id, J.TRIAL_CANCELLED, reason=reason)
        self._cancel_jobs([t.job_id for t in active])

    def _finish(self, *, cancelled: bool) -> SearchState:
        state = self.state()
        best = state.best_trial(self.spec.search.direction)
        if best is not None and self.spec.objective.kind == "train" and state.promoted is None:
            self._promote(best)
        counts: dict[str, int] = {}
        for t in state.trials.values():
            counts[t.state] = counts.get(t.state, 0) + 1
        best_rec = None
        if best is not None:
            best_rec = {
                "trial": best.id,
                "value": best.value,
                "params": best.params,
                "job_id": best.job_id,
                "run_dir": best.run_dir,
            }
        self.journal.append(J.SEARCH_FINISHED, best=best_rec, cancelled=cancelled, counts=counts)
        if best is not None:
            params = _fmt_params(best.params)
            self.echo(f"search finished: best trial {best.id} = {best.value:.6g} {params}")
        else:
            self.echo("search finished with no successful trial")
        return self.state()

    def _promote(self, best: TrialRecord) -> None:
        """Alias ``best`` on the best trial's final model in the repository (train objective)."""
        if not best.run_dir:
            return
        try:
            result = fsutil.read_json(Path(best.run_dir) / RESULT_FILE)
        except (OSError, ValueError):
            self.echo(f"trial {best.id} left no {RESULT_FILE}: no model to promote")
            return
        ref = result.get("final_ref")
        if not ref:
            self.echo(f"trial {best.id} saved no final model: nothing to promote")
            return
        try:
            config = fsutil.read_json(Path(best.run_dir) / "train.json")
            repository = config.get("repository") or str(self.site.models_root)
        except (OSError, ValueError):
            repository = str(self.site.models_root)
        try:
            promoted = promote_best(repository, str(ref), self.spec.search.name)
        except Exception as exc:  # noqa: BLE001 - the search result stands without the alias
            self.echo(f"promotion of {ref} failed: {exc}")
            return
        self.journal.append(J.MODEL_PROMOTED, trial=best.id, ref=str(ref), **promoted)
        model, number = promoted["model"], promoted["version"]
        to = " and ".join(f"{model}@{a}" for a in promoted["aliases"])
        was = promoted["previous"]
        moved = f" (it was on {model}:{was})" if was not in (None, number) else ""
        self.echo(f"promoted {model}:{number} to {to}{moved}")
        if promoted["best_kept"] is not None:
            self.echo(
                f"{model}@best stays on {model}:{promoted['best_kept']}: another search set it; "
                f"this search's best is {model}@{promoted['alias']}"
            )

    # ------------------------------------------------------------------------- lock & signals

    def _take_lock(self) -> None:
        holder = J.live_lock_holder(self.lock.path, DRIVER_STALE_S)
        if holder is not None and holder.host == socket.gethostname():
            raise ConflictError(
                f"search {self.sdir.path} is being driven by {holder.describe()}; "
                "use `aimass search status` to watch it"
            )
        try:
            self.lock.acquire(timeout=DRIVER_STALE_S * 1.2)
        except ConflictError as exc:
            raise ConflictError(f"another driver holds this search: {exc}") from None

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        numbers: set[int] = set()
        for name in ("TERM", "INT", "HUP", self.site.preemption.signal):
            with contextlib.suppress(ValueError):  # a signal this host does not have
                numbers.add(parse_signal(name))
        for sig in numbers:
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (tests running the driver in a thread)
                return previous
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signal_name(signum)

    def _maybe_requeue_self(self) -> None:
        """Detached driver warned of its time limit: requeue its own job (it resumes)."""
        job_id = os.environ.get("SLURM_JOB_ID")
        try:
            warn: str | None = signal_name(parse_signal(self.site.preemption.signal))
        except ValueError:
            warn = None
        if job_id and self._stop_signal == warn and os.environ.get("AIMASS_SEARCH_DRIVER"):
            self.lock.release()
            try:
                self.scheduler.requeue(job_id)
                self.echo(f"driver job {job_id} requeued")
            except Exception as exc:  # noqa: BLE001
                self.echo(f"could not requeue the driver job {job_id}: {exc}")


# ---------------------------------------------------------------------------------------------
# Requests (shared by the driver and --dry-run)


def trial_payload(
    spec: SearchSpec, sdir: SearchDir, trial_id: int, params: dict[str, Any], attempt: int
) -> dict[str, Any]:
    """What the trial's run directory records about it (spec.json)."""
    return {
        "search": {"name": spec.search.name, "dir": str(sdir.path), "metric": spec.search.metric},
        "trial": trial_id,
        "params": params,
        "attempt": attempt,
    }


def _payload_trial(payload: Any) -> int | None:
    """The trial id stored by :func:`trial_payload`, wherever submission nested it."""
    if not isinstance(payload, dict):
        return None
    if "trial" in payload and isinstance(payload.get("search"), dict):
        tid = payload["trial"]
        return tid if isinstance(tid, int) else None
    for value in payload.values():
        found = _payload_trial(value)
        if found is not None:
            return found
    return None


def build_trial(
    spec: SearchSpec, site: Site, sdir: SearchDir, trial_id: int, params: dict[str, Any]
) -> tuple[JobRequest, dict[str, str]]:
    """One trial's job request and the files its run directory gets (``params.json``, and
    ``train.json`` for a training objective)."""
    res = spec.trial
    files = {PARAMS_FILE: json.dumps(params, indent=2, sort_keys=True) + "\n"}
    env = {
        **spec.objective.env,
        "AIMASS_TRIAL_ID": str(trial_id),
        "AIMASS_TRIAL_PARAMS": json.dumps(params, sort_keys=True),
        "AIMASS_SEARCH_DIR": str(sdir.path),
        "AIMASS_SEARCH_METRIC": spec.search.metric,
    }
    name = f"{spec.search.name}-t{trial_id:04d}"
    if spec.objective.kind == "train":
        # The training capability plans the job (backend, ranks, train.json); the trial only
        # injects its params, renames it and adds its environment. kind stays "train" so
        # train.j2 sets up the distributed world; preempted trials resume from checkpoints.
        from aimass_hpc.config.train_spec import load_train_spec, plan_training

        assert spec.train_spec_path is not None
        train = load_train_spec(spec.train_spec_path, train_overrides(spec, params))
        values = placeholder_values(
            params, spec.space_obj().names, trial_id=trial_id, python=site.python
        )
        plan = plan_training(train, site, values)
        files.update(plan.files())
        request = plan.request.model_copy(
            update={
                "name": name,
                "env": {**plan.request.env, **env},
                "constraint": res.constraint or plan.request.constraint,
                "template_vars": {
                    **plan.request.template_vars,
                    "trial_id": trial_id,
                    "study": str(sdir.path),
                },
            }
        )
        return request, files
    # trial.j2 exports AIMASS_TRIAL_ID and AIMASS_STUDY from template_vars itself
    env.pop("AIMASS_TRIAL_ID")
    command = format_command(
        spec.objective.command or [], params, trial_id=trial_id, python=site.python
    )
    tasks = res.nodes * res.ntasks_per_node
    request = JobRequest(
        kind="trial",
        name=name,
        command=command,
        env=env,
        nodes=res.nodes,
        ntasks_per_node=res.ntasks_per_node,
        gpus_per_node=res.gpus_per_node,
        cpus_per_task=res.cpus_per_task,
        mem=res.mem,
        time=res.time,
        partition=res.partition or site.search.partition,
        account=res.account,
        qos=res.qos,
        constraint=res.constraint,
        requeue=res.requeue and site.preemption.max_restarts > 0,
        launcher=res.launcher or ("none" if tasks == 1 else None),
        workdir=str(spec.workdir),
        template_vars={"trial_id": trial_id, "study": str(sdir.path)},
    )
    return request, files


def driver_request(spec: SearchSpec, site: Site, sdir: SearchDir) -> JobRequest:
    """The ``--detach`` job: one CPU running ``aimass search resume DIR`` beside the trials."""
    drv = spec.driver
    partition = drv.partition or site.search.partition
    time_limit = drv.time
    if time_limit is None:
        # As long as the partition allows: the driver outlives the trials. On the warning
        # signal before the limit it requeues itself and resumes from the journal.
        part = site.partition(partition)
        time_limit = part.max_time if part.max_seconds is not None else "7-00:00:00"
    return JobRequest(
        kind="job",
        name=f"{spec.search.name}-driver",
        command=[site.python, "-m", "aimass_hpc", "search", "resume", str(sdir.path)],
        env={"AIMASS_SEARCH_DRIVER": "1", "OMP_NUM_THREADS": "1"},
        nodes=1,
        ntasks_per_node=1,
        cpus_per_task=1,
        mem=drv.mem,
        time=time_limit,
        partition=partition,
        account=drv.account,
        qos=drv.qos,
        requeue=site.preemption.max_restarts > 0,
        launcher="none",
        workdir=str(sdir.path),
    )


BEST_ALIAS = "best"  # the plain alias: owned by the first search name over a model


def best_alias(search_name: str) -> str:
    """The alias a search puts on its best model: ``best-<search name>``.

    A search name (letters, digits, ``_ . -``, at most 80) always makes a valid alias name
    (``aimass_hpc.common.names.ALIAS_NAME``), so every search name has its own alias.
    """
    return f"{BEST_ALIAS}-{search_name}"


def promote_best(
    repository: str | os.PathLike[str], ref: str, search_name: str | None = None
) -> dict[str, Any]:
    """Point the best alias at model version ``ref`` (``name:number``) in ``repository``.

    With ``search_name``: ``NAME@best-<search name>`` (see :func:`best_alias`), and the plain
    ``NAME@best`` only when it is unset or still points where this search name's alias does
    (it belongs to the first search name that set it; another search never moves it).
    Without: the plain ``best`` (the old behaviour). Returns ``model``, ``version``,
    ``alias`` (the search's alias), ``aliases`` (all set), ``previous`` (what the search's
    alias pointed at before, or None) and ``best_kept`` (the version the plain ``best``
    stayed on when it belongs to another search, else None).
    """
    from aimass_hpc.repo import ModelRepository
    from aimass_hpc.repo.refs import Ref

    name = Ref.parse(ref, "final_ref").name
    repo = ModelRepository(repository)
    if search_name is None:
        version = repo.promote(name, ref, BEST_ALIAS)
        return {"model": version.name, "version": version.number, "alias": BEST_ALIAS,
                "aliases": [BEST_ALIAS], "previous": None, "best_kept": None}  # fmt: skip
    alias = best_alias(search_name)
    mine = repo.alias_version(name, alias)
    plain = repo.alias_version(name, BEST_ALIAS)
    version = repo.promote(name, ref, alias)
    aliases = [alias]
    kept = None
    if plain is None or plain == mine:
        repo.promote(name, version.number, BEST_ALIAS)
        aliases.append(BEST_ALIAS)
    elif plain != version.number:
        kept = plain
    return {"model": version.name, "version": version.number, "alias": alias,
            "aliases": aliases, "previous": mine, "best_kept": kept}  # fmt: skip


def _fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)
