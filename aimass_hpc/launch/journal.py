"""The search journal: an append-only JSON-lines log on the shared filesystem.

Why not SQLite: its locking is unreliable on NFS/Lustre. A journal of small JSON records, one
line each, written under a lock file and fsynced, is safe there and easy to read by hand.

Writers take :class:`FileLock` (a lock file created with ``O_CREAT|O_EXCL``, holding the holder's
host, pid and time), append one line, fsync, close and release. Closing before release matters on
NFS: close-to-open consistency means the next writer sees the new size. A lock whose holder died
(same host: the pid is gone) or that has not changed for ``stale_after`` seconds is broken under
a second O_EXCL *takeover marker*, so two waiters never both break it and never remove a fresh
lock. Readers need no lock: they take only complete lines and skip a torn line left by a crash.

Damage is told apart from a crash. A writer killed mid-line leaves a torn fragment (the start of
a record, no newline); the next writer ends it with a newline, so the fragment may also sit
between two records. Every record carries ``seq``, its index among the valid records when it was
written, so a torn fragment (never counted) leaves no gap, while a lost or garbled record does.
Hence: an incomplete last line, or an unreadable line whose successor's ``seq`` shows nothing
missing, is tolerated and reported (:meth:`Journal.notes`); anything else -- a record missing, a
line that is not UTF-8, a JSON value that is not an object, a record with a field of the wrong
type -- raises :class:`~aimass_hpc.common.errors.IntegrityError` (exit 6) naming the file and line.

Replaying the records (:func:`replay`) yields the whole search state; the driver writes a record
*before* it acts (propose -> journal -> submit -> journal the job id) so a kill between any two
steps is recoverable. A long-lived reader (the driver) keeps one state and applies only the
records appended since its last read (:meth:`Journal.state`), so a poll costs the same whatever
the length of the journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from aimass_hpc.common import procstat
from aimass_hpc.common.errors import ConflictError, IntegrityError
from aimass_hpc.common.fsutil import os_error, shown_path

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.jsonl"

# Record types, in the order a trial usually sees them.
SEARCH_CREATED = "search_created"
DRIVER_SUBMITTED = "driver_submitted"  # --detach: the driver's own job
DRIVER_STARTED = "driver_started"
TRIAL_PROPOSED = "trial_proposed"
TRIAL_SUBMITTED = "trial_submitted"
TRIAL_RUNNING = "trial_running"
TRIAL_FINISHED = "trial_finished"
TRIAL_FAILED = "trial_failed"
TRIAL_PRUNED = "trial_pruned"
TRIAL_LOST = "trial_lost"
TRIAL_CANCELLED = "trial_cancelled"
CANCEL_REQUESTED = "cancel_requested"
MODEL_PROMOTED = "model_promoted"
SEARCH_FINISHED = "search_finished"


# Trial states after replay. Terminal states never change again: the first terminal record wins,
# so a late or repeated record (a job adopted twice, an orphan finishing) cannot rewrite history.
PROPOSED = "proposed"  # journaled, not (known to be) submitted yet
SUBMITTED = "submitted"  # has a job id; pending or running in the scheduler
RUNNING = "running"
LOST = "lost"  # its job vanished or was preempted without requeue; to be resubmitted
FINISHED = "finished"
FAILED = "failed"
PRUNED = "pruned"
CANCELLED = "cancelled"
TERMINAL_STATES = frozenset({FINISHED, FAILED, PRUNED, CANCELLED})
ACTIVE_STATES = frozenset({PROPOSED, SUBMITTED, RUNNING, LOST})

_HOST = socket.gethostname()

TRIAL_RECORD_TYPES = frozenset(
    {
        TRIAL_PROPOSED,
        TRIAL_SUBMITTED,
        TRIAL_RUNNING,
        TRIAL_FINISHED,
        TRIAL_FAILED,
        TRIAL_PRUNED,
        TRIAL_LOST,
        TRIAL_CANCELLED,
    }
)
RECORD_TYPES = TRIAL_RECORD_TYPES | {
    SEARCH_CREATED,
    DRIVER_SUBMITTED,
    DRIVER_STARTED,
    CANCEL_REQUESTED,
    MODEL_PROMOTED,
    SEARCH_FINISHED,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or _is_int(value)


# The type of each field replay reads (None is allowed unless the field is required).
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "time": (_is_number, "a number"),
    "trial": (_is_id, "a trial id (an integer or a string)"),
    "params": (lambda v: isinstance(v, dict), "a table of parameters"),
    "job_id": (_is_id, "a job id"),
    "run_dir": (lambda v: isinstance(v, str), "a path"),
    "value": (_is_number, "a number"),
    "reason": (lambda v: isinstance(v, str), "a string"),
    "started_at": (_is_number, "a number"),
    "ended_at": (_is_number, "a number"),
    "step": (_is_int, "an integer"),
    "spec": (lambda v: isinstance(v, dict), "a table"),
    "site": (lambda v: isinstance(v, str), "a site name or path"),
    "best": (lambda v: isinstance(v, dict), "a table"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    SEARCH_CREATED: ("spec",),
    TRIAL_SUBMITTED: ("trial", "job_id"),
    **{kind: ("trial",) for kind in TRIAL_RECORD_TYPES if kind != TRIAL_SUBMITTED},
}


def _kind_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def record_problem(rec: Any, *, require_seq: bool = True) -> str | None:
    """What is wrong with journal record ``rec`` (None when it is a well-formed record).

    Checks what :func:`replay` relies on: a known ``type``, a ``seq`` count, and the type of
    every field it reads. Fields it does not read are free (a newer writer may add some).
    """
    if not isinstance(rec, dict):
        return f"a JSON {_kind_name(rec).split()[-1]}, not a record (a JSON object)"
    kind = rec.get("type")
    if not isinstance(kind, str):
        return f"'type' is {_kind_name(kind)}, not a record type"
    if kind not in RECORD_TYPES:
        return f"unknown record type {kind[:60]!r}"
    seq = rec.get("seq")
    if (require_seq or seq is not None) and not (_is_int(seq) and seq >= 0):
        return f"'seq' is {_kind_name(seq)} ({str(seq)[:40]!r}), not a count"
    for key in _REQUIRED.get(kind, ()):
        if rec.get(key) is None:
            return f"a {kind} record without '{key}'"
    for key, (ok, what) in _FIELD_TYPES.items():
        value = rec.get(key)
        if value is not None and not ok(value):
            return f"'{key}' of a {kind} record is {_kind_name(value)}, not {what}"
    return None


# ---------------------------------------------------------------------------------------------
# Lock files


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock file, as written inside it."""

    host: str
    pid: int
    start: int | None  # process start time in clock ticks (Linux), guards against pid reuse
    time: float
    token: str
    purpose: str = ""

    def describe(self) -> str:
        age = max(0.0, time.time() - self.time)
        what = f" ({self.purpose})" if self.purpose else ""
        return f"pid {self.pid} on {self.host}{what}, taken {age:.0f}s ago"


def pid_alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` (started at ``start`` ticks, when known) still exists here."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now_start = procstat.start_ticks(pid)
        if now_start is not None and now_start != start:
            return False  # the pid was reused by another process
    return True


def live_lock_holder(path: str | os.PathLike[str], stale_after: float) -> LockHolder | None:
    """The holder of lock ``path`` if it looks alive: its pid exists (same host) or the lock
    was refreshed within ``stale_after`` seconds (another host); else None."""
    holder = read_lock_holder(path)
    if holder is None:
        return None
    if holder.host == _HOST:
        return holder if pid_alive(holder.pid, holder.start) else None
    try:
        fresh = time.time() - os.stat(path).st_mtime < stale_after
    except FileNotFoundError:
        return None
    return holder if fresh else None


def read_lock_holder(path: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in lock file ``path``; None when absent, empty or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.loads(fh.read())
        return LockHolder(
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            start=raw.get("start"),
            time=float(raw["time"]),
            token=str(raw["token"]),
            purpose=str(raw.get("purpose", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class FileLock:
    """A lock file created with O_EXCL, safe on NFS/Lustre, with stale-lock recovery.

    ``stale_after``: a lock whose file has not changed for this long (by its mtime, and by what
    this process has watched) is presumed abandoned; a holder on this host whose pid is gone is
    abandoned at once. Long holders call :meth:`refresh` (a heartbeat) well within that time.
    ``timeout``: how long :meth:`acquire` waits before raising :class:`ConflictError`;
    None waits forever.
    """

    TAKEOVER_STALE_S = 10.0  # breaking a lock takes milliseconds; a marker older than this died

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stale_after: float = 30.0,
        timeout: float | None = 120.0,
        purpose: str = "",
    ) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self.timeout = timeout
        self.purpose = purpose
        self._token: str | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (as far as it knows)."""
        return self._token is not None

    def acquire(self, timeout: float | None = None, *, blocking: bool = True) -> None:
        """Take the lock, waiting up to ``timeout`` (default: the constructor's)."""
        if self._token is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        # What we saw of the current lock and since when (local monotonic clock): a lock file
        # unchanged for stale_after seconds is stale even if the clocks of the hosts disagree.
        seen: tuple[Any, ...] | None = None
        seen_since = time.monotonic()
        while True:
            token = uuid.uuid4().hex
            if self._try_create(token):
                self._token = token
                return
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                continue  # released between our attempt and the stat: try again at once
            holder = read_lock_holder(self.path)
            ident = (st.st_ino, st.st_mtime_ns, holder.token if holder else None)
            if ident != seen:
                seen, seen_since = ident, time.monotonic()
            reason = self._stale_reason(holder, st, time.monotonic() - seen_since)
            if reason is not None and self._break(ident, reason):
                continue
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                who = holder.describe() if holder else "an unknown holder"
                raise ConflictError(f"lock {self.path} is held by {who}")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)

    def _try_create(self, token: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        payload = {
            "host": _HOST,
            "pid": os.getpid(),
            "start": procstat.start_ticks(os.getpid()),
            "time": time.time(),
            "token": token,
            "purpose": self.purpose,
        }
        try:
            os.write(fd, json.dumps(payload).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _stale_reason(
        self, holder: LockHolder | None, st: os.stat_result, watched_s: float
    ) -> str | None:
        if holder is not None and holder.host == _HOST and not pid_alive(holder.pid, holder.start):
            return f"holder pid {holder.pid} is gone"
        # A live holder on this host is never stale: it could be slow, not dead.
        if holder is not None and holder.host == _HOST:
            return None
        age = time.time() - st.st_mtime
        if age > self.stale_after or watched_s > self.stale_after:
            who = holder.describe() if holder else "an empty lock file"
            return f"unchanged for {max(age, watched_s):.0f}s ({who})"
        return None

    def _break(self, ident: tuple[Any, ...], reason: str) -> bool:
        """Remove the stale lock ``ident`` under a takeover marker; True when it was removed."""
        marker = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # Someone else is breaking it. A marker left by a breaker that died is removed.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(marker).st_mtime > self.TAKEOVER_STALE_S:
                    os.unlink(marker)
            return False
        os.close(fd)
        try:
            # Re-check under the marker: only the very lock judged stale may be removed.
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return True
            holder = read_lock_holder(self.path)
            if (st.st_ino, st.st_mtime_ns, holder.token if holder else None) != ident:
                return False
            log.warning("breaking stale lock %s: %s", self.path, reason)
            return _remove_lock_file(self.path, ident[2])
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)

    def refresh(self) -> None:
        """Heartbeat for a long holder: touch the lock so waiters do not think it stale."""
        if self._token is None:
            raise RuntimeError(f"lock {self.path} is not held")
        holder = read_lock_holder(self.path)
        if holder is None or holder.token != self._token:
            self._token = None
            raise ConflictError(f"lock {self.path} was taken over by another process")
        os.utime(self.path)

    def release(self) -> None:
        """Give the lock back. Never removes a lock that another process has taken over."""
        token, self._token = self._token, None
        if token is None:
            return
        if not _remove_lock_file(self.path, token):
            log.warning("lock %s was taken over before release", self.path)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove_lock_file(path: Path, token: str | None) -> bool:
    """Remove lock ``path`` if it still carries ``token``; True when removed (or gone).

    Rename first, then look at what was moved: if another process took the lock in between,
    its file is linked back (``link`` fails rather than overwrite a newer lock).
    """
    grave = path.with_name(f"{path.name}.{uuid.uuid4().hex}.released")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True
    moved = read_lock_holder(grave)
    moved_token = moved.token if moved else None
    if moved_token != token:
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
        os.unlink(grave)
        return False
    os.unlink(grave)
    return True


# ---------------------------------------------------------------------------------------------
# The journal file


class Journal:
    """An append-only JSON-lines journal at ``path`` with a sibling lock file.

    Every record gets ``type``, ``time`` (epoch seconds) and ``seq`` (its index among the valid
    records, assigned under the lock, so a replay can spot a gap).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_stale_after: float = 30.0,
        lock_timeout: float | None = 120.0,
    ) -> None:
        self.path = Path(path)
        self.lock = FileLock(
            self.path.with_name(self.path.name + ".lock"),
            stale_after=lock_stale_after,
            timeout=lock_timeout,
            purpose="journal append",
        )
        # Incremental reader: bytes (and lines) consumed so far and the records they held.
        self._offset = 0
        self._line = 0
        self._records: list[dict[str, Any]] = []
        self._torn: list[int] = []  # lines of torn fragments a later record showed harmless
        self._pending: list[int] = []  # unreadable complete lines no record has followed yet
        self._tail = 0  # bytes of an incomplete last line (a writer died, or is writing)
        self._tail_line = 1
        # The bytes after _offset as last read without error (pending lines and a torn tail):
        # the same bytes again mean nothing new, so nothing is parsed again.
        self._unconsumed = b""
        self.parsed_lines = 0  # lines parsed so far (a poll with nothing new parses none)
        # The incremental state: _records[:_applied] are applied to _state.
        self._state = SearchState()
        self._applied = 0

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Journal:
        """The journal of a search directory."""
        return cls(Path(directory) / JOURNAL_NAME, **kwargs)

    def exists(self) -> bool:
        """Whether the journal file exists."""
        return self.path.exists()

    def append(self, type: str, **fields: Any) -> dict[str, Any]:
        """Append one record under the lock (fsynced before return); returns the record."""
        return self.append_many([{"type": type, **fields}])[0]

    def append_many(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append several records in one locked write; returns them with ``seq``/``time``."""
        for rec in records:
            if rec.get("type") not in RECORD_TYPES:
                raise ValueError(f"unknown journal record type {rec.get('type')!r}")
        try:
            with self.lock:
                self._catch_up()
                now = time.time()
                out = []
                for i, rec in enumerate(records):
                    # seq is assigned here, never taken from the caller
                    full = {"time": now, **rec, "seq": len(self._records) + i}
                    out.append(full)
                data = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in out)
                self._write_locked(data.encode("utf-8"))
                self._catch_up()
        except OSError as exc:
            raise os_error(exc, f"journal {shown_path(self.path)}: cannot append") from None
        return out

    def _write_locked(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                # A writer killed mid-line left a torn tail: end it so our record starts on a
                # line of its own (readers skip the torn fragment).
                last = os.pread(fd, 1, size - 1)
                if last != b"\n":
                    data = b"\n" + data
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _catch_up(self) -> None:
        """Read the complete lines appended since the last read (see the module docstring).

        Raises :class:`IntegrityError` naming the file and line for a damaged journal; nothing
        is consumed then, so every later read says the same. What looks damaged is read again
        once first: on NFS the pages of a write in flight can show up out of order.
        """
        for attempt in (1, 2):
            try:
                fh = open(self.path, "rb")  # noqa: SIM115 - closed below, seek needs the handle
            except FileNotFoundError:
                return
            except OSError as exc:
                raise os_error(exc, f"journal {shown_path(self.path)}: cannot read") from None
            with fh:
                fh.seek(self._offset)
                chunk = fh.read()
            if chunk == self._unconsumed:
                return  # nothing appended (and a torn tail unchanged): already read
            try:
                self._consume(chunk)
                return
            except IntegrityError:
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def _consume(self, chunk: bytes) -> None:
        """Take the records of ``chunk`` (the bytes after ``self._offset``).

        Consumed: everything through the last valid record. Unreadable lines after it stay
        unconsumed (``_pending``), to be read again: a later record decides whether they were
        torn (no record missing) or damage (a gap in ``seq``).
        """
        end = chunk.rfind(b"\n")
        self._tail = len(chunk) - (end + 1)
        line = self._line
        consumed, consumed_line = 0, line
        fresh: list[dict[str, Any]] = []
        torn: list[int] = []
        pending: list[int] = []
        position = 0
        for raw in chunk[:end].split(b"\n") if end >= 0 else ():
            line += 1
            position += len(raw) + 1
            rec = self._parse_line(raw, line)
            if rec is None:
                if raw.strip(b" \t\r"):
                    pending.append(line)  # unreadable: torn, unless a record goes missing
                elif not pending:
                    consumed, consumed_line = position, line  # a blank line
                continue
            expected = len(self._records) + len(fresh)
            if rec["seq"] > expected:
                if pending:
                    raise self._damaged(
                        pending[0],
                        f"unreadable (not a whole JSON record); record {expected} is lost with it",
                    )
                raise self._damaged(
                    line,
                    f"record seq {rec['seq']} where {expected} was due: "
                    f"{rec['seq'] - expected} record(s) before it are missing",
                )
            torn += pending
            pending = []
            fresh.append(rec)
            consumed, consumed_line = position, line
        for number in torn:
            log.info("journal %s line %d: skipped a torn record", self.path, number)
        self._records.extend(fresh)
        self._torn.extend(torn)
        self._pending = pending
        self._tail_line = line + 1
        self._line = consumed_line
        self._offset += consumed
        self._unconsumed = chunk[consumed:]

    def _parse_line(self, raw: bytes, line: int) -> dict[str, Any] | None:
        """The record on one complete line; None for a blank or torn-looking line."""
        self.parsed_lines += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._damaged(
                line, f"not UTF-8 text (byte {exc.start + 1} of the line)"
            ) from None
        body = text.strip(" \t\r\x00")
        if not body:
            return None  # blank, or the zeros a crash can leave where a record was due
        try:
            rec = json.loads(body)
        except ValueError:
            if body.startswith("{"):
                return None  # the start of a record: torn by a writer that died
            raise self._damaged(line, "not a journal record (not JSON)") from None
        problem = record_problem(rec)
        if problem is not None:
            raise self._damaged(line, problem)
        return rec

    def _damaged(self, line: int, problem: str) -> IntegrityError:
        return IntegrityError(
            f"journal {shown_path(self.path)} line {line}: {problem}; the journal is damaged "
            "(repair or remove the line by hand, or start the search again)"
        )

    def notes(self) -> list[str]:
        """What the reader tolerated and skipped, one line each (for ``search status``)."""
        name = shown_path(self.path)
        out = [f"journal {name} line {n}: skipped a torn record" for n in self._torn]
        out += [
            f"journal {name} line {n}: skipped an unreadable last line (a torn record)"
            for n in self._pending
        ]
        if self._tail:
            out.append(
                f"journal {name} line {self._tail_line}: ignoring an incomplete last line "
                f"({self._tail} bytes): a writer died mid-record, or is writing it now"
            )
        return out

    def records(self) -> list[dict[str, Any]]:
        """All complete records so far (a torn last line is skipped)."""
        self._catch_up()
        return list(self._records)

    def state(self) -> SearchState:
        """The search state of all complete records so far, kept between calls.

        Each call reads only the bytes appended since the last one and applies only the new
        records, so it costs nothing when nothing was appended. The object returned is the
        same every time, updated in place (callers read it, never modify it). A record that
        cannot be applied raises :class:`IntegrityError` now and on every later call, as a
        full :func:`replay` would.
        """
        self._catch_up()
        while self._applied < len(self._records):
            # apply() changes nothing when it raises, so the next call tries the same record
            self._state.apply(self._records[self._applied], checked=True)
            self._applied += 1
        return self._state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())


# ---------------------------------------------------------------------------------------------
# Replay


@dataclass
class TrialRecord:
    """One trial as the journal tells it."""

    id: Any
    params: dict[str, Any]
    state: str = PROPOSED
    job_id: str | None = None
    run_dir: str | None = None
    attempts: int = 0  # submissions so far (a lost trial is resubmitted under the same id)
    job_ids: list[str] = field(default_factory=list)
    value: float | None = None
    reason: str | None = None
    proposed_at: float | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    pruned_step: int | None = None

    @property
    def terminal(self) -> bool:
        """Whether the trial has reached its final state."""
        return self.state in TERMINAL_STATES

    @property
    def duration(self) -> float | None:
        """Seconds from start (or submission) to end; None while unknown."""
        begin = self.started_at or self.submitted_at
        if begin is None:
            return None
        if self.ended_at is None:
            return None
        return max(0.0, self.ended_at - begin)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view (for ``aimass search status --json``)."""
        return {
            "id": self.id,
            "params": self.params,
            "state": self.state,
            "value": self.value,
            "job_id": self.job_id,
            "job_ids": self.job_ids,
            "run_dir": self.run_dir,
            "attempts": self.attempts,
            "reason": self.reason,
            "duration_s": self.duration,
            "proposed_at": self.proposed_at,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


_TERMINAL_OF = {
    TRIAL_FINISHED: FINISHED,
    TRIAL_FAILED: FAILED,
    TRIAL_PRUNED: PRUNED,
    TRIAL_CANCELLED: CANCELLED,
}


@dataclass
class SearchState:
    """The whole search as replayed from its journal.

    Built record by record (:meth:`apply`), so a reader that keeps it applies only what is new.
    It also keeps, outside comparison, the trials still active and the best finished trial
    each way, so the driver's questions per poll do not walk every trial of a long search.
    """

    spec: dict[str, Any] | None = None
    created_at: float | None = None
    trials: dict[Any, TrialRecord] = field(default_factory=dict)  # in proposal order
    cancel_requested: bool = False
    finished: bool = False
    best: dict[str, Any] | None = None
    promoted: dict[str, Any] | None = None
    drivers: list[dict[str, Any]] = field(default_factory=list)
    driver_jobs: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = -1
    # Indexes kept by apply(): the non-terminal trials (in proposal order), the proposal rank
    # of each trial (ties of best_trial go to the earliest), the best finished trial for
    # minimize / maximize, and whether a NaN value was seen (best_trial then scans, as before).
    _active: dict[Any, TrialRecord] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _rank: dict[Any, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _best: dict[str, TrialRecord] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _nan_value: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def n_proposed(self) -> int:
        """Trials proposed so far (counts toward the budget)."""
        return len(self.trials)

    def by_state(self, *states: str) -> list[TrialRecord]:
        """Trials currently in any of ``states``, in proposal order."""
        # Active states only (every per-poll question): the active index, not every trial.
        pool = self._active if ACTIVE_STATES.issuperset(states) else self.trials
        return [t for t in pool.values() if t.state in states]

    @property
    def active(self) -> list[TrialRecord]:
        """Trials not yet in a terminal state."""
        return list(self._active.values())

    def best_trial(self, direction: str) -> TrialRecord | None:
        """The finished trial with the best value (ties: the earliest)."""
        if not self._nan_value:
            return self._best.get("minimize" if direction == "minimize" else "maximize")
        # A NaN value compares false both ways: keep the plain scan's exact answer.
        done = [t for t in self.trials.values() if t.state == FINISHED and t.value is not None]
        if not done:
            return None
        sign = 1.0 if direction == "minimize" else -1.0
        return min(done, key=lambda t: sign * float(t.value))  # type: ignore[arg-type]

    def apply(
        self, rec: dict[str, Any], *, position: int | None = None, checked: bool = False
    ) -> None:
        """Apply one journal record (records in journal order).

        Raises :class:`IntegrityError` for a malformed record (unless ``checked``: the journal
        reader validated it) or one naming an unknown trial, changing nothing then.
        ``position``: the record's index, named in the error when it carries no ``seq``.
        """
        if not checked:
            problem = record_problem(rec, require_seq=False)
            if problem is not None:
                where = rec.get("seq", position) if isinstance(rec, dict) else position
                raise IntegrityError(f"journal record {where}: {problem}")
        kind = rec.get("type")
        trial: TrialRecord | None = None
        if kind in TRIAL_RECORD_TYPES and kind != TRIAL_PROPOSED:
            tid = rec.get("trial")
            trial = self.trials.get(tid)
            if trial is None:
                raise IntegrityError(
                    f"journal record {rec.get('seq')} ({kind}) names unknown trial {tid!r}"
                )
        self.last_seq = max(self.last_seq, int(rec.get("seq", self.last_seq)))
        when = rec.get("time")
        if kind == SEARCH_CREATED:
            if self.spec is None:
                self.spec = rec.get("spec")
                self.created_at = when
        elif kind == DRIVER_SUBMITTED:
            self.driver_jobs.append({k: v for k, v in rec.items() if k not in ("type", "seq")})
        elif kind == DRIVER_STARTED:
            self.drivers.append({k: v for k, v in rec.items() if k not in ("type", "seq")})
        elif kind == CANCEL_REQUESTED:
            self.cancel_requested = True
        elif kind == MODEL_PROMOTED:
            self.promoted = {k: v for k, v in rec.items() if k not in ("type", "seq")}
        elif kind == SEARCH_FINISHED:
            self.finished = True
            self.best = rec.get("best")
        elif kind == TRIAL_PROPOSED:
            tid = rec["trial"]
            if tid in self.trials:
                log.warning("journal: trial %s proposed twice; keeping the first", tid)
                return
            new = TrialRecord(id=tid, params=dict(rec.get("params") or {}))
            new.proposed_at = when
            self.trials[tid] = new
            self._active[tid] = new
            self._rank[tid] = len(self._rank)
        elif trial is not None and not trial.terminal:  # first terminal record wins
            self._apply_to_trial(trial, kind, rec, when)

    def _apply_to_trial(
        self, trial: TrialRecord, kind: Any, rec: dict[str, Any], when: Any
    ) -> None:
        if kind == TRIAL_SUBMITTED:
            trial.state = SUBMITTED
            trial.job_id = str(rec["job_id"])
            trial.job_ids.append(trial.job_id)
            trial.run_dir = rec.get("run_dir", trial.run_dir)
            trial.attempts += 1
            trial.submitted_at = when
            trial.started_at = None
        elif kind == TRIAL_RUNNING:
            if trial.state == SUBMITTED and str(rec.get("job_id")) == trial.job_id:
                trial.state = RUNNING
                trial.started_at = rec.get("started_at", when)
        elif kind == TRIAL_LOST:
            trial.state = LOST
            trial.reason = rec.get("reason")
        elif kind in _TERMINAL_OF:
            trial.state = _TERMINAL_OF[kind]
            trial.value = rec.get("value")
            trial.reason = rec.get("reason")
            trial.ended_at = rec.get("ended_at", when)
            if rec.get("started_at") is not None:
                trial.started_at = rec["started_at"]
            if kind == TRIAL_PRUNED:
                trial.pruned_step = rec.get("step")
            self._active.pop(trial.id, None)
            if trial.state == FINISHED and trial.value is not None:
                self._note_finished(trial)

    def _note_finished(self, trial: TrialRecord) -> None:
        """Update the best trial each way with a newly finished one."""
        try:
            value = float(trial.value)  # type: ignore[arg-type]
        except OverflowError:  # an integer beyond float: let best_trial scan (and say so)
            value = math.nan
        if math.isnan(value):
            self._nan_value = True
            return
        rank = self._rank[trial.id]
        for direction, sign in (("minimize", 1.0), ("maximize", -1.0)):
            best = self._best.get(direction)
            if best is None:
                self._best[direction] = trial
                continue
            mine, theirs = sign * value, sign * float(best.value)  # type: ignore[arg-type]
            if mine < theirs or (mine == theirs and rank < self._rank[best.id]):
                self._best[direction] = trial


def replay(records: list[dict[str, Any]]) -> SearchState:
    """Rebuild the search state from journal records (pure; order = journal order)."""
    st = SearchState()
    for index, rec in enumerate(records):
        st.apply(rec, position=index)
    return st


def ensure_new_trial_id(state: SearchState, trial_id: Any) -> None:
    """Refuse a trial id the journal already knows (a trial is never duplicated)."""
    if trial_id in state.trials:
        raise ConflictError(f"trial {trial_id!r} is already in the journal")


__all__ = [
    "FileLock",
    "Journal",
    "LockHolder",
    "SearchState",
    "TrialRecord",
    "live_lock_holder",
    "pid_alive",
    "read_lock_holder",
    "record_problem",
    "replay",
]
