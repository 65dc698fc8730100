"""Endpoint records: how clients find a running service.

Each replica owns one JSON file ``<run_dir>/endpoints/<job_id>.<replica>.json`` that it
rewrites atomically (:mod:`aimass_hpc.common.fsutil`) at every state change::

    PENDING -> LOADING -> READY -> DRAINING -> STOPPED
                      \\-> FAILED

Only READY records are offered to clients, and a client still checks ``/readyz`` before it
trusts one (a record can outlive a replica killed with SIGKILL). DRAINING marks a replica that
still finishes its in-flight requests but takes no new clients: it is how a blue/green switch
or a time-limit handover hands traffic over without a failed request.

A record names its replica's ``engine`` (``"vllm"``; None, as in records written before the
field existed, is the built-in torch server): the supervisor checks each engine its own way.

Every state change is kept in the record's ``history`` (``{state, at, why}``, the newest
last). A record the service supervisor gave up on is *fenced*: it says FAILED with the reason
in ``fenced``, and a replica that wakes up later (a SIGSTOP-ed process continued) cannot
write it back to READY -- :func:`write_record` keeps a fenced record FAILED.

A run directory holding the file ``serve.stop`` is being stopped: a replica's time-limit
handover submits no replacement there (and cancels one it queued just before the file
appeared), and the supervisor replaces nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.fsutil import atomic_write_json, read_json
from aimass_hpc.repo.refs import Ref

ENDPOINTS_DIRNAME = "endpoints"
STOP_MARKER = "serve.stop"  # in a run directory: the service is being stopped
HISTORY_LIMIT = 50  # state changes kept per record (the oldest are dropped)
# How deep under a runs root run directories may sit (runs/<id>/ or runs/<kind>/<id>/...).
_SEARCH_DEPTH = 3


class EndpointState(StrEnum):
    """Lifecycle of one replica."""

    PENDING = "PENDING"
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


FINAL_STATES = frozenset({EndpointState.FAILED, EndpointState.STOPPED})


def now_iso() -> str:
    """UTC timestamp for records."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class EndpointRecord:
    """One replica of a service, as written to ``<run_dir>/endpoints/``."""

    model_ref: str  # what was asked for: name@alias, name:version or name (see .parsed_ref)
    model_name: str
    version: str | None  # the version the ref resolved to
    state: str
    job_id: str
    replica: int
    run_dir: str
    host: str | None = None
    port: int | None = None
    pid: int | None = None
    node: str | None = None
    started: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    token_file: str | None = None
    message: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # {state, at, why}
    fenced: str | None = None  # why the supervisor took this replica out of service
    engine: str | None = None  # "vllm", or None for the built-in torch server (older records)

    @property
    def url(self) -> str | None:
        """Base URL, or None before the replica is listening."""
        if not self.host or not self.port:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def engine_name(self) -> str:
        """The engine serving this replica: ``engine``, or ``"torch"`` where none is named."""
        return self.engine or "torch"

    @property
    def key(self) -> str:
        """File stem: unique per job and replica."""
        return f"{self.job_id}.{self.replica}"

    def path(self) -> Path:
        """Where this record lives."""
        return record_dir(self.run_dir) / f"{self.key}.json"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (includes the derived ``url``)."""
        d = asdict(self)
        d["url"] = self.url
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EndpointRecord:
        """Parse a record; unknown keys (from newer writers) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def parsed_ref(self) -> Ref | None:
        """``model_ref`` parsed, or None when it is not a repository reference (a replica
        started from a recipe file announces what it was given)."""
        try:
            return Ref.parse(self.model_ref)
        except InputError:
            return None

    def matches(self, target: str | Ref) -> bool:
        """Does this replica serve ``target``? Parsed references are compared, never text:

        * ``NAME`` (= ``NAME:latest`` = ``NAME@latest``): every replica of the model;
        * ``NAME:N``: replicas serving version N, or started as ``NAME:N`` (still PENDING);
        * ``NAME@ALIAS``: replicas started as ``NAME@ALIAS`` (what an upgrade switches).

        A bad ``target`` is an ``InputError`` naming it.
        """
        want = Ref.parse(target, "target")
        if self.model_name != want.name:
            return False
        if want.alias is not None:
            return self.parsed_ref == want
        if want.version is not None:
            return str(self.version) == str(want.version) or self.parsed_ref == want
        return True


def record_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/endpoints``."""
    return Path(run_dir) / ENDPOINTS_DIRNAME


def write_record(record: EndpointRecord, state: str | None = None, **changes: Any) -> None:
    """Update ``record`` in place (state, other fields, ``updated``) and write it atomically.

    A state change is appended to ``history`` (with ``message`` as its reason). What another
    writer put in the file is kept: its longer history, and a fence (the record stays FAILED).
    """
    if state is not None:
        record.state = str(EndpointState(state))
    for key, value in changes.items():
        if not hasattr(record, key):
            raise AttributeError(f"EndpointRecord has no field {key!r}")
        setattr(record, key, value)
    record.updated = now_iso()
    _merge_on_disk(record)
    if record.fenced:
        record.state = str(EndpointState.FAILED)
    last = record.history[-1]["state"] if record.history else None
    if record.state != last:
        why = changes.get("message") or record.fenced or ""
        record.history.append({"state": record.state, "at": record.updated, "why": why})
        del record.history[:-HISTORY_LIMIT]
    record_dir(record.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(record.path(), record.to_dict())


def _merge_on_disk(record: EndpointRecord) -> None:
    """Take the fence and a longer history from the file another writer left."""
    try:
        disk = read_json(record.path())
    except (OSError, ValueError):
        return
    if not isinstance(disk, dict):
        return
    if disk.get("fenced") and not record.fenced:
        record.fenced = str(disk["fenced"])
    hist = disk.get("history")
    if isinstance(hist, list) and len(hist) > len(record.history):
        record.history = [h for h in hist if isinstance(h, dict)]


def stop_requested(run_dir: str | os.PathLike[str]) -> bool:
    """Is the service of ``run_dir`` being stopped (``serve.stop`` exists)?"""
    return (Path(run_dir) / STOP_MARKER).exists()


def read_records(run_dir: str | os.PathLike[str]) -> list[EndpointRecord]:
    """All records of one run directory, oldest first; unreadable files are skipped."""
    return _read_files(sorted(record_dir(run_dir).glob("*.json")))


def _read_files(paths: Iterable[Path]) -> list[EndpointRecord]:
    out: list[EndpointRecord] = []
    for p in paths:
        try:
            out.append(EndpointRecord.from_dict(read_json(p)))
        except (OSError, ValueError, TypeError):
            continue  # vanished or not ours: never fatal for discovery
    out.sort(key=lambda r: (r.started, r.key))
    return out


def find_records(
    runs_root: str | os.PathLike[str],
    target: str | Ref | None = None,
    states: Iterable[str] | None = None,
) -> list[EndpointRecord]:
    """Records under a runs root (run dirs up to a few levels deep), filtered.

    ``target`` filters by model (see :meth:`EndpointRecord.matches`); ``states`` by state.
    """
    root = Path(runs_root)
    paths: list[Path] = []
    pattern = ENDPOINTS_DIRNAME + "/*.json"
    for depth in range(_SEARCH_DEPTH + 1):
        paths.extend(root.glob("/".join(["*"] * depth + [pattern])))
    wanted = {str(EndpointState(s)) for s in states} if states is not None else None
    want = Ref.parse(target, "target") if target is not None else None  # bad: one clear error
    out = []
    for rec in _read_files(paths):
        if wanted is not None and rec.state not in wanted:
            continue
        if want is not None and not rec.matches(want):
            continue
        out.append(rec)
    return out


def cluster_address() -> str:
    """This node's address on the cluster network (what a replica binds to by default).

    The address the node's own hostname resolves to; where that is unresolvable, the
    address of the interface that routes outwards; loopback as the last resort (a
    single-host cluster such as the dev cluster).
    """
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if addr:
            return addr
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
