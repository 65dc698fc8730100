"""The Models page's data: the repository's search, versions with lineage, aliases."""

from __future__ import annotations

from typing import Any

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.common.units import Range, parse_range
from aimass_hpc.dashboard.paging import page_of
from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo.records import Version


def parse_metrics(items: list[str]) -> dict[str, Range]:
    """``["acc=0.9..", "loss=..0.5"]`` -> ``{"acc": (0.9, None), ...}``."""
    out: dict[str, Range] = {}
    for item in items:
        key, sep, rng = item.partition("=")
        if not sep or not key.strip() or not rng:
            raise InputError(f"metric: expected NAME=LO..HI (got {item!r})")
        out[key.strip()] = parse_range(rng, f"metric {key.strip()}")
    return out


def row(v: Version, aliases: list[str]) -> dict[str, Any]:
    """One version as the pages show it (no tensors, no paths beyond the file's)."""
    return {
        "ref": v.ref,
        "name": v.name,
        "version": v.number,
        "kind": v.kind,
        "model_type": v.model_type,
        "flops_per_sample": v.flops_per_sample,
        "peak_memory_bytes": v.peak_memory_bytes,
        "param_count": v.param_count,
        "file_size": v.file_size,
        "metrics": v.metrics,
        "tags": v.tags,
        "created": v.created,
        "parent": v.parent,
        "run": v.run,
        "description": v.description,
        "aliases": aliases,
    }


class ModelsView:
    """Search and actions on one model repository."""

    def __init__(self, repo: ModelRepository) -> None:
        self.repo = repo

    def _aliases_of(self, name: str) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for alias, n in self.repo.aliases(name).items():
            out.setdefault(n, []).append(alias)
        return out

    def search(
        self,
        *,
        name: str = "*",
        model_type: str | None = None,
        flops: str | None = None,
        memory: str | None = None,
        metrics: list[str] | None = None,
        tags: list[str] | None = None,
        kind: str | None = None,
        page: int = 1,
        page_size: int = 50,
    ) -> dict[str, Any]:
        """One page of the versions matching every filter (newest model versions first)."""
        found = self.repo.search(
            name or "*",
            tags=tags or None,
            metrics=parse_metrics(metrics or []),
            flops=parse_range(flops, "flops", "count") if flops else None,
            memory=parse_range(memory, "memory", "memory") if memory else None,
            kind=kind or None,
            model_type=model_type or None,
        )
        found.sort(key=lambda v: (v.name, -v.number))
        out = page_of(found, page, page_size)
        chunk = out["rows"]
        aliases = {n: self._aliases_of(n) for n in {v.name for v in chunk}}
        out["rows"] = [row(v, aliases[v.name].get(v.number, [])) for v in chunk]
        return out

    def model(self, name: str) -> dict[str, Any]:
        """Every version of ``name`` (newest first) with lineage, and its aliases' histories."""
        if name not in self.repo.names():
            raise NotFoundError(f"model {name!r}: not in the repository")
        by_version = self._aliases_of(name)
        versions = [
            row(v, by_version.get(v.number, [])) for v in reversed(self.repo.versions(name))
        ]
        aliases = [
            {"alias": a, "version": n, "history": self.repo.alias_history(name, a)}
            for a, n in sorted(self.repo.aliases(name).items())
        ]
        return {"name": name, "versions": versions, "aliases": aliases}

    def promote(self, name: str, version: int, alias: str) -> dict[str, Any]:
        """Point ``name@alias`` at ``name:version``."""
        v = self.repo.promote(name, version, alias)
        return {"alias": f"{name}@{alias}", "ref": v.ref}

    def rollback(self, name: str, alias: str) -> dict[str, Any]:
        """Point ``name@alias`` back at its previous target."""
        v = self.repo.rollback(name, alias)
        return {"alias": f"{name}@{alias}", "ref": v.ref}

    def verify(self, name: str, version: int) -> dict[str, Any]:
        """Re-hash every tensor of ``name:version``."""
        report = self.repo.verify(f"{name}:{version}")
        return {**report.to_dict(), "message": report.message}

    def delete(self, name: str, version: int, confirm: str, force: bool = False) -> dict[str, Any]:
        """Delete ``name:version``; ``confirm`` must repeat its ref (the page's confirmation)."""
        ref = f"{name}:{version}"
        if confirm != ref:
            raise InputError(f"confirm: type {ref} to delete it (got {confirm!r})")
        v = self.repo.delete(ref, force=force)
        return {"deleted": v.ref}
