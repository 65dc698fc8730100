"""Who, where and with what a version was saved: collected once per save, stored as JSON."""

from __future__ import annotations

import getpass
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aimass_hpc import __version__
from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import shown

_SLURM_VARS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "cluster": "SLURM_CLUSTER_NAME",
    "partition": "SLURM_JOB_PARTITION",
    "nodelist": "SLURM_JOB_NODELIST",
    "restart_count": "SLURM_RESTART_COUNT",
}


def now_iso(ts: float | None = None) -> str:
    """UTC timestamp like ``2025-01-31T12:00:00.123456Z``."""
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any, what: str = "time") -> float:
    """Epoch seconds from a datetime, epoch number, ISO-8601 string or relative ``7d``/``12h``."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.astimezone()
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        if text[:-1].replace(".", "", 1).isdigit() and text[-1:] in units:
            return time.time() - float(text[:-1]) * units[text[-1]]
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parse_time(dt, what)
    raise InputError(
        f"invalid {what} {value!r}: use an ISO date (2025-01-31, 2025-01-31T12:00) or an age "
        "like 7d / 12h"
    )


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the git checkout containing ``start`` (cwd), read without running git.

    Best effort: a directory we may not read (another user's checkout) means "unknown".
    """
    env = os.environ.get("AIMASS_GIT_COMMIT") or os.environ.get("GIT_COMMIT")
    if env:
        return env
    try:
        return _git_commit_of((start or Path.cwd()).resolve())
    except OSError:
        return None


def _git_commit_of(here: Path) -> str | None:
    for d in (here, *here.parents):
        git = d / ".git"
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            text = git.read_text(errors="replace").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (d / text.partition(":")[2].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head or None
            ref = head.partition(":")[2].strip()
            common = git
            if (git / "commondir").is_file():
                common = (git / (git / "commondir").read_text().strip()).resolve()
            for base in (git, common):
                if (base / ref).is_file():
                    return (base / ref).read_text().strip()
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    sha, _, name = line.partition(" ")
                    if name == ref:
                        return sha
        except OSError:
            return None
        return None
    return None


def framework_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reading a checkpoint back."""
    import h5py
    import numpy

    out = {
        "python": platform.python_version(),
        "aimass_hpc": __version__,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        cuda = getattr(torch.version, "cuda", None)
        if cuda:
            out["cuda"] = cuda
    return out


def environment() -> dict[str, Any]:
    """created/user/host/Slurm/git/framework fields for a new version."""
    ts = time.time()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    slurm = {k: os.environ[v] for k, v in _SLURM_VARS.items() if os.environ.get(v)}
    return {
        "created": now_iso(ts),
        "created_ts": ts,
        "user": user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": slurm.get("job_id"),
        "slurm": slurm,
        "git_commit": git_commit(),
        "framework": framework_versions(),
    }


def check_json(value: Any, field: str) -> Any:
    """Return ``value`` if it is plain JSON (dicts with string keys, lists, scalars)."""
    try:
        json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{field} must be plain JSON (no NaN, objects or non-string keys): {exc}"
        ) from None
    return value


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
    """Metrics are named real numbers (searchable by range); 0-d tensors and numpy scalars ok."""
    out: dict[str, float | int] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not key:
            raise InputError(f"metric names must be non-empty strings, got {key!r}")
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"metric {key!r} must be a number, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"metric {key!r} must be finite, got {value}")
        out[key] = value
    return out


def check_tags(tags: Iterable[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or any(c.isspace() for c in tag):
            raise InputError(f"tags must be non-empty strings without spaces, got {tag!r}")
        if tag not in out:
            out.append(tag)
    return out


# What a model does, searchable with ``aimass models search --type``: a small closed set, so a
# search for "classifier" finds every classifier ("other" for everything else).
MODEL_TYPES = (
    "classifier",
    "regressor",
    "language-model",
    "embedding",
    "segmentation",
    "detection",
    "generative",
    "other",
)


def check_model_type(value: Any, field: str = "model_type") -> str | None:
    """``value`` if it is one of :data:`MODEL_TYPES` (or None), else a one-line InputError."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in MODEL_TYPES:
        raise InputError(f"{field} {shown(value)} is not one of {', '.join(MODEL_TYPES)}")
    return value


def check_number(value: Any, field: str, integer: bool = False) -> float | int | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value < 0 or not math.isfinite(value):
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise InputError(f"{field} must be {kind}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# The stored fields readers rely on, with the type each must have when present (None is
# always allowed: "not recorded"). Anything else in a metadata document is passed through.
_STORED_FIELDS: dict[str, tuple[str, Any]] = {
    "name": ("a string", lambda v: isinstance(v, str)),
    "version": ("an integer", _is_int),
    "kind": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string", lambda v: isinstance(v, str)),
    "created_ts": ("a number", _is_number),
    "contents": ("a list of strings", _str_list),
    "tags": ("a list of strings", _str_list),
    "metrics": (
        "an object of numbers",
        lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
    ),
    "hyperparameters": ("an object", lambda v: isinstance(v, dict)),
    "dtypes": (
        "an object of counts",
        lambda v: isinstance(v, dict) and all(_is_int(x) for x in v.values()),
    ),
    "framework": ("an object", lambda v: isinstance(v, dict)),
    "parent": ("a string", lambda v: isinstance(v, str)),
    "description": ("a string", lambda v: isinstance(v, str)),
    "file_size": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "param_count": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "tensor_count": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "tensor_bytes": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "flops_per_sample": ("a non-negative number", lambda v: _is_number(v) and v >= 0),
    "peak_memory_bytes": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "model_type": ("a string", lambda v: isinstance(v, str)),
    "shard_key": ("a string", lambda v: isinstance(v, str)),
    "world_size": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "shards": ("a list of objects", lambda v: isinstance(v, list)),
}


def stored_problem(meta: Any) -> str | None:
    """What is wrong with a stored metadata document (sidecar or file), or None if usable.

    Readers (``aimass models ls/show/search``, loading) index these fields by type; a
    document edited by hand or damaged must be caught here, not end in a traceback.
    """
    if not isinstance(meta, dict):
        return f"holds {type(meta).__name__}, not an object"
    for key, (kind, ok) in _STORED_FIELDS.items():
        value = meta.get(key)
        if value is not None and not ok(value):
            return f"field {key!r} is {shown(value)}, not {kind}"
    if meta.get("kind") == "sharded":
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards:
            return "field 'shards' of a sharded version is missing or empty"
        for i, s in enumerate(shards):
            if not isinstance(s, dict):
                return f"shard entry {i} is {shown(s)}, not an object"
            if s.get("rank") != i or not _is_int(s.get("rank")):
                return f"shard entry {i} has rank {shown(s.get('rank'))}, not {i}"
            if not isinstance(s.get("file"), str) or not s["file"]:
                return f"shard entry {i} has file {shown(s.get('file'))}, not a path"
            size = s.get("size")
            if size is not None and not (_is_int(size) and size >= 0):
                return f"shard entry {i} has size {shown(size)}, not a non-negative integer"
    return None
