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
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimass_hpc.errors import InputError, NotFoundError
from aimass_hpc.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

INDEX_DIR = ".jobs"
_LOG_RE = re.compile(r"^(?:task-(?P<task>\d+)-)?restart-(?P<restart>\d+)\.log$")
_JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")


def _leaf_name(name: str) -> str:
    """A directory-name-safe short form of a job name (the exact name lives in spec.json)."""
    safe = re.sub(r"[^A-Za-z0-9_.+\-]", "_", name).strip("._-")[:48]
    return safe or "job"


@dataclass(frozen=True)
class RunDir:
    """A run directory (it may not exist yet for previews)."""

    path: Path

    # ------------------------------------------------------------------ creation

    @classmethod
    def new_path(cls, root: str | os.PathLike[str], name: str) -> RunDir:
        """A fresh, unused path under ``root`` (nothing is created)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cls(Path(root) / f"{stamp}-{_leaf_name(name)}-{secrets.token_hex(3)}")

    @classmethod
    def create(cls, root: str | os.PathLike[str], name: str) -> RunDir:
        """Create a new run directory (with ``logs/``) under ``root``."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            run = cls.new_path(root, name)
            try:
                run.path.mkdir()
            except FileExistsError:
                continue
            run.logs_dir.mkdir()
            return run
        raise InputError(f"could not create a unique run directory under {root}")

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
        atomic_write_json(self.spec_path, spec)

    def read_spec(self) -> dict[str, Any]:
        return read_json(self.spec_path)

    def write_script(self, text: str) -> None:
        atomic_write_text(self.script_path, text, mode=0o755)

    def write_file(self, relpath: str, data: bytes | str) -> Path:
        """Write an extra file (e.g. a config the job reads) inside the run directory."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise InputError(f"files: {relpath!r} must be a relative path inside the run dir")
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            atomic_write_text(target, data)
        else:
            atomic_write_bytes(target, data)
        return target

    def read_state(self) -> dict[str, Any]:
        try:
            return read_json(self.state_path)
        except FileNotFoundError:
            return {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into state.json (read-modify-write; the login side is the writer)."""
        state = self.read_state()
        state.update(fields)
        state["updated_at"] = time.time()
        atomic_write_json(self.state_path, state)
        return state

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
            match = _LOG_RE.match(entry.name)
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
            match = _LOG_RE.match(path.name)
            if match and int(match.group("restart")) == restart:
                return path
        return None

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
        return self.path.is_dir()


# ------------------------------------------------------------------ the job-id index


def index_job(root: str | os.PathLike[str], job_id: str, run: RunDir) -> None:
    """Record that ``job_id`` lives in ``run`` (``<root>/.jobs/<job_id>``)."""
    index = Path(root) / INDEX_DIR
    index.mkdir(parents=True, exist_ok=True)
    atomic_write_text(index / str(job_id), run.path.name + "\n")


def find_run(ref: str, root: str | os.PathLike[str]) -> RunDir:
    """A run directory by job id (``123``, ``123_4`` for an array task), by path, or ``last``
    (the newest run under ``root``).

    Raises ``NotFoundError`` naming ``ref`` when nothing matches.
    """
    if ref == "last":
        newest = list_runs(root, limit=1)
        if not newest:
            raise NotFoundError(f"no runs under {root}")
        return newest[0]
    as_path = Path(os.path.expanduser(ref))
    if as_path.is_dir() and (as_path / "state.json").exists():
        return RunDir(as_path.resolve())
    if _JOB_ID_RE.match(ref):
        # Search trials keep their own index inside their search directory.
        for base in (Path(root), *sorted(Path(root).glob("searches/*/trials"), reverse=True)):
            run = _indexed_run(base, ref)
            if run is not None:
                return run
        raise NotFoundError(f"no run directory for job {ref} under {root}")
    candidate = Path(root) / ref
    if candidate.is_dir() and (candidate / "state.json").exists():
        return RunDir(candidate)
    raise NotFoundError(f"no run directory {ref!r} (give a job id or a run directory path)")


def _indexed_run(base: Path, ref: str) -> RunDir | None:
    """The run recorded for job ``ref`` (or its array parent) in ``base``'s index, if any."""
    for key in (ref, ref.split("_", 1)[0]):
        entry = base / INDEX_DIR / key
        if entry.is_file():
            run = RunDir(base / entry.read_text(encoding="utf-8").strip())
            if run.exists():
                return run
    return None


def list_runs(root: str | os.PathLike[str], limit: int | None = 20) -> list[RunDir]:
    """The most recent run directories under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [
        RunDir(entry)
        for entry in root.iterdir()
        if not entry.name.startswith(".") and (entry / "state.json").exists()
    ]
    runs.sort(key=lambda run: run.path.name, reverse=True)
    return runs[:limit] if limit else runs
