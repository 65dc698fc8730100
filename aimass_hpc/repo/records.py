"""Value types handed out by the repository: versions, loaded checkpoints, reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, order=True)
class Version:
    """One committed, immutable model version and its metadata (no tensors)."""

    name: str
    number: int
    path: Path = field(compare=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ref(self) -> str:
        """The canonical reference, ``name:number``."""
        return f"{self.name}:{self.number}"

    def _get(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key)
        return default if value is None else value

    created = property(lambda self: self._get("created"), doc="ISO-8601 UTC creation time")
    created_ts = property(lambda self: self._get("created_ts", 0.0), doc="creation, epoch s")
    kind = property(lambda self: self._get("kind", "model"), doc="model|checkpoint|sharded")
    contents = property(lambda self: list(self._get("contents", [])), doc="what it holds")
    metrics = property(lambda self: dict(self._get("metrics", {})), doc="named numbers")
    tags = property(lambda self: list(self._get("tags", [])), doc="tags")
    hyperparameters = property(lambda self: dict(self._get("hyperparameters", {})))
    recipe = property(lambda self: self._get("recipe"), doc="how serving rebuilds the model")
    run = property(lambda self: self._get("run"), doc="the run that produced it")
    parent = property(lambda self: self._get("parent"), doc="lineage: parent ref or None")
    description = property(lambda self: self._get("description"))
    flops_per_sample = property(lambda self: self._get("flops_per_sample"))
    peak_memory_bytes = property(lambda self: self._get("peak_memory_bytes"))
    model_type = property(lambda self: self._get("model_type"), doc="classifier, regressor, ...")
    param_count = property(lambda self: self._get("param_count", 0))
    file_size = property(lambda self: self._get("file_size", 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the metadata plus ``ref`` and ``path``."""
        return {
            **self.metadata,
            "name": self.name,
            "version": self.number,
            "ref": self.ref,
            "path": str(self.path),
        }


@dataclass
class Checkpoint:
    """A loaded version: tensors (mapped from the file where possible) and its metadata.

    For a sharded version loaded without ``shard=``, ``state_dict`` merges all ranks and
    ``optimizer``/``extra`` are lists indexed by rank.
    """

    state_dict: dict[str, Any]
    optimizer: Any
    extra: Any
    version: Version
    shard: int | None = None

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.version.metadata


@dataclass
class VerifyReport:
    """The outcome of :meth:`ModelRepository.verify`: which tensors (if any) failed."""

    ref: str
    path: str
    ok: bool
    tensors: int = 0
    bytes: int = 0
    failures: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def message(self) -> str:
        """One line: ``ok`` or the first problem (and how many more)."""
        if self.ok:
            return f"{self.ref}: ok ({self.tensors} tensors, {self.bytes} bytes)"
        problems = ([self.error] if self.error else []) + self.failures
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{self.ref}: {problems[0]}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "path": self.path,
            "ok": self.ok,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "failures": self.failures,
            "error": self.error,
        }


@dataclass
class GcReport:
    """What :meth:`ModelRepository.gc` removed (or would remove, with ``dry_run``)."""

    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept_in_progress: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "bytes_freed": self.bytes_freed,
            "kept_in_progress": self.kept_in_progress,
            "dry_run": self.dry_run,
        }
