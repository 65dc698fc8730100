"""Run directories: one per submission, on the shared filesystem.

Layout (``<root>/<YYYYmmdd-HHMMSS>-<name>-<rand>/``)::

    spec.json       resolved request + site + the caller's own spec payload
    job.sh          the script exactly as submitted
    state.json      small mutable state: status, job id, timestamps (login-node side)
    logs/           restart-N.log (task-I-restart-N.log for arrays) written by the job itself;
                    slurm-<jobid>.out catches what the script prints before its exec redirect
    metrics.jsonl   appended by the workload
    endpoints/      service endpoint files (serve)

``<root>/.jobs/<jobid>`` holds the run directory's name so a job id finds its run directory
(:func:`find_run`). The batch script is submitted with the run directory as its working
directory; the job exports ``AIMASS_RUN_DIR`` and ``AIMASS_JOB_NAME``.

A runs root that cannot be written (a path under a regular file, too long a name, no
permission, a read-only or full filesystem) is one line naming the path and the OS reason:
exit 2 when the path is unusable (give another ``filesystems.runs``), exit 5 when the system
failed (a full disk, a quota, an I/O error); see :func:`aimass_hpc.common.fsutil.os_error`. A run
directory whose setup fails half-way is removed again: nothing half-made is left behind, and
the job-id index is only ever replaced atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import AimassError, InputError, IntegrityError, NotFoundError
from aimass_hpc.common.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    os_error,
    read_json,
    shown_path,
)

INDEX_DIR = ".jobs"
_LOG_RE = re.compile(r"(?:task-(?P<task>[0-9]+)-)?restart-(?P<restart>[0-9]+)\.log")
_JOB_ID_RE = re.compile(r"[0-9]+(?:_[0-9]+)?")


def _leaf_name(name: str) -> str:
    """A directory-name-safe short form of a job name (the exact name lives in spec.json)."""
    safe = re.sub(r"[^A-Za-z0-9_.+\-]", "_", name).strip("._-")[:48]
    return safe or "job"


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False for a path the OS cannot even look up (too long a name...)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a path the OS cannot even look up."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a path the OS cannot even look up."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class RunDir:
    """A run directory (it may not exist yet for previews).

    ``fresh``: this process created it (:meth:`create`) and may still be setting it up. Until
    its ``state.json`` is written, a failed write into it removes the whole directory again, so
    a submission that fails half-way leaves nothing half-made behind.
    """

    path: Path
    fresh: bool = field(default=False, compare=False, repr=False)

    # ------------------------------------------------------------------ creation

    @classmethod
    def new_path(cls, root: str | os.PathLike[str], name: str) -> RunDir:
        """A fresh, unused path under ``root`` (nothing is created)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cls(Path(root) / f"{stamp}-{_leaf_name(name)}-{secrets.token_hex(3)}")

    @classmethod
    def create(cls, root: str | os.PathLike[str], name: str) -> RunDir:
        """Create a new run directory (with ``logs/``) under ``root``.

        Raises a one-line :class:`~aimass_hpc.common.errors.AimassError` naming the path and the OS
        reason when ``root`` cannot be created or written (exit 2 for an unusable path, 5 for
        a system failure); nothing is left behind.
        """
        root = Path(root)
        if _exists(root) and not _is_dir(root):
            raise InputError(f"runs root {shown_path(root)} exists and is not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"runs root {shown_path(root)}: cannot create it") from None
        for _ in range(10):
            run = cls(cls.new_path(root, name).path, fresh=True)
            try:
                run.path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise os_error(
                    exc, f"runs root {shown_path(root)}: cannot create a run directory in it"
                ) from None
            try:
                run.logs_dir.mkdir()
            except OSError as exc:
                run.discard()
                raise os_error(exc, f"run directory {shown_path(run.path)}: cannot write") from None
            return run
        raise InputError(f"could not create a unique run directory under {shown_path(root)}")

    def discard(self) -> None:
        """Remove this run directory if this process created it and never finished it.

        A run directory with a ``state.json`` is never removed (a job may be running in it).
        """
        if not self.fresh:
            return
        try:
            if self.state_path.exists():
                return
        except OSError:
            return  # cannot tell: leave it
        shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def _writing(self, target: Path) -> Iterator[None]:
        """Turn an OSError while writing ``target`` into a one-line error (and clean up)."""
        try:
            yield
        except OSError as exc:
            self.discard()
            raise os_error(exc, f"cannot write {shown_path(target)}") from None

    # ------------------------------------------------------------------ paths

    @property
    def root(self) -> Path:
        """The runs root this directory lives in."""
        return self.path.parent

    @property
    def spec_path(self) -> Path:
        return self.path / "spec.json"

    @property
    def script_path(self) -> Path:
        return self.path / "job.sh"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def endpoints_dir(self) -> Path:
        return self.path / "endpoints"

    # ------------------------------------------------------------------ content

    def write_spec(self, spec: dict[str, Any]) -> None:
        """Write ``spec.json`` (atomically)."""
        with self._writing(self.spec_path):
            atomic_write_json(self.spec_path, spec)

    def read_spec(self) -> dict[str, Any]:
        """The run's ``spec.json`` as written (OSError / ValueError pass to the caller: the
        search driver skips an orphan whose spec is missing or half-written)."""
        return read_json(self.spec_path)

    def write_script(self, text: str) -> None:
        """Write the batch script ``job.sh`` (atomically, executable)."""
        with self._writing(self.script_path):
            atomic_write_text(self.script_path, text, mode=0o755)

    def write_file(self, relpath: str, data: bytes | str) -> Path:
        """Write an extra file (e.g. a config the job reads) inside the run directory."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            self.discard()
            raise InputError(f"files: {relpath!r} must be a relative path inside the run dir")
        target = self.path / rel
        with self._writing(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, str):
                atomic_write_text(target, data)
            else:
                atomic_write_bytes(target, data)
        return target

    def read_state(self) -> dict[str, Any]:
        """The run's ``state.json`` ({} before it is written); IntegrityError when damaged."""
        try:
            return self._read_object(self.state_path)
        except FileNotFoundError:
            return {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into state.json (read-modify-write; the login side is the writer)."""
        state = self.read_state()
        state.update(fields)
        state["updated_at"] = time.time()
        with self._writing(self.state_path):
            atomic_write_json(self.state_path, state)
        return state

    @staticmethod
    def _read_object(path: Path) -> dict[str, Any]:
        """A JSON object file; FileNotFoundError passes, other problems are one-line errors."""
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise os_error(exc, f"cannot read {shown_path(path)}") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise IntegrityError(f"{shown_path(path)}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise IntegrityError(
                f"{shown_path(path)}: expected a JSON object, found {type(data).__name__}"
            )
        return data

    @property
    def job_id(self) -> str | None:
        """The scheduler's job id, once submitted."""
        return self.read_state().get("job_id")

    @property
    def name(self) -> str:
        """The job's exact name (from state.json, else the directory name)."""
        return self.read_state().get("name") or self.path.name

    def log_files(self, task: int | None = None) -> list[Path]:
        """The job's per-restart logs, oldest restart first (optionally one array task's)."""
        found: list[tuple[int, int, Path]] = []
        if not self.logs_dir.is_dir():
            return []
        for entry in self.logs_dir.iterdir():
            match = _LOG_RE.fullmatch(entry.name)
            if not match:
                continue
            entry_task = int(match.group("task")) if match.group("task") else -1
            if task is not None and entry_task != task:
                continue
            found.append((int(match.group("restart")), entry_task, entry))
        return [path for _, _, path in sorted(found)]

    def log_file(self, restart: int | None = None, task: int | None = None) -> Path | None:
        """The log of restart ``restart`` (default: the latest), or None if there is none yet."""
        files = self.log_files(task)
        if restart is None:
            return files[-1] if files else None
        for path in files:
            match = _LOG_RE.fullmatch(path.name)
            if match and int(match.group("restart")) == restart:
                return path
        return None

    def exit_record(self, task: int | None = None) -> dict[str, Any] | None:
        """How the latest attempt ended, from the job script's exit record, or None.

        The generic template writes ``logs/exit-[task-T-]restart-N.json`` (``exit_code``,
        ``job_id``, ``restart``) when its shell exits. Only the record of the latest restart
        that has a log counts: an earlier restart's record describes a requeued attempt.
        Missing (the node died, launcher "none") or unreadable records give None.
        """
        latest = self.log_file(task=task)
        if latest is None:
            return None
        path = self.logs_dir / ("exit-" + latest.name.removesuffix(".log") + ".json")
        try:
            record = read_json(path)
        except (OSError, ValueError):
            return None
        code = record.get("exit_code") if isinstance(record, dict) else None
        if not isinstance(code, int) or isinstance(code, bool):
            return None
        return record

    def record_outcome(self, outcome: dict[str, Any]) -> None:
        """Record how the job ended (``state.json``'s ``outcome``, as ``aimass status`` showed
        it: a COMPLETED job whose ``result.json`` says it failed is FAILED here too).

        Written only when it changed, so that repeated status calls do not rewrite the file;
        a run directory that cannot be written is left as it was (it is a record, not the
        answer the user asked for).
        """
        try:
            if self.read_state().get("outcome") == outcome:
                return
            self.update_state(outcome=outcome)
        except (OSError, AimassError):
            return

    def batch_logs(self) -> list[Path]:
        """Slurm's own output files (what the script printed before its exec redirect)."""
        found: list[Path] = []
        for directory in (self.logs_dir, self.path):  # a plain script may use Slurm's default
            if directory.is_dir():
                found += sorted(
                    p for p in directory.iterdir() if p.name.startswith("slurm-") and p.is_file()
                )
        return found

    def exists(self) -> bool:
        """Whether the run directory exists."""
        return _is_dir(self.path)


# ------------------------------------------------------------------ the job-id index


def index_job(root: str | os.PathLike[str], job_id: str, run: RunDir) -> None:
    """Record that ``job_id`` lives in ``run`` (``<root>/.jobs/<job_id>``).

    The entry is replaced atomically, so a failure leaves the index as it was. The job is
    already queued when this runs: the error says so, with its run directory.
    """
    index = Path(root) / INDEX_DIR
    entry = index / str(job_id)
    try:
        index.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, run.path.name + "\n")
    except OSError as exc:
        raise os_error(
            exc,
            f"job {job_id} was queued (run directory {shown_path(run.path)}), but its index "
            f"entry {shown_path(entry)} could not be written",
        ) from None


def _shown_ref(ref: str) -> str:
    return repr(ref if len(ref) <= 80 else f"{ref[:40]}...{ref[-20:]} ({len(ref)} chars)")


def find_run(ref: str, root: str | os.PathLike[str]) -> RunDir:
    """A run directory by job id (``123``, ``123_4`` for an array task), by path, or ``last``
    (the newest run under ``root``).

    Raises ``NotFoundError`` naming ``ref`` when nothing matches.
    """
    if ref == "last":
        newest = list_runs(root, limit=1)
        if not newest:
            raise NotFoundError(f"no runs under {shown_path(root)}")
        return newest[0]
    as_path = Path(os.path.expanduser(ref))
    if _is_dir(as_path) and _is_file(as_path / "state.json"):
        return RunDir(as_path.resolve())
    if _JOB_ID_RE.fullmatch(ref):
        # Search trials keep their own index inside their search directory.
        base_root = Path(root)
        try:
            trial_bases = sorted(base_root.glob("searches/*/trials"), reverse=True)
        except OSError:
            trial_bases = []
        for base in (base_root, *trial_bases):
            run = _indexed_run(base, ref)
            if run is not None:
                return run
        raise NotFoundError(f"no run directory for job {ref} under {shown_path(root)}")
    candidate = Path(root) / ref
    if _is_dir(candidate) and _is_file(candidate / "state.json"):
        return RunDir(candidate)
    raise NotFoundError(
        f"no run directory {_shown_ref(ref)} (give a job id or a run directory path)"
    )


def _indexed_run(base: Path, ref: str) -> RunDir | None:
    """The run recorded for job ``ref`` (or its array parent) in ``base``'s index, if any.

    An unreadable or nonsensical entry (not one plain directory name) counts as absent.
    """
    for key in (ref, ref.split("_", 1)[0]):
        entry = base / INDEX_DIR / key
        try:
            name = entry.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            continue
        run = RunDir(base / name)
        if run.exists():
            return run
    return None


def list_runs(root: str | os.PathLike[str], limit: int | None = 20) -> list[RunDir]:
    """The most recent run directories under ``root``, newest first."""
    root = Path(root)
    if not _is_dir(root):
        return []
    try:
        runs = [
            RunDir(entry)
            for entry in root.iterdir()
            if not entry.name.startswith(".") and _is_file(entry / "state.json")
        ]
    except OSError as exc:
        raise os_error(exc, f"runs root {shown_path(root)}: cannot list it") from None
    runs.sort(key=lambda run: run.path.name, reverse=True)
    return runs[:limit] if limit else runs
