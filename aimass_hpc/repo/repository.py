"""The model repository: versioned, immutable HDF5 checkpoints in a directory tree.

Training saves checkpoints into it, the search promotes its best trial in it, and serving
loads from it; all through :class:`ModelRepository`. The directory protocol (allocation,
commit, aliases) is described in :mod:`aimass_hpc.repo.layout`, the file format in
:mod:`aimass_hpc.repo.h5format`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import math
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aimass_hpc.common.errors import ConflictError, InputError, IntegrityError, NotFoundError
from aimass_hpc.common.fsutil import atomic_write_json, fsync_dir, publish_file, read_json
from aimass_hpc.repo import h5format, metadata
from aimass_hpc.repo.codec import TensorPool, encode_sections
from aimass_hpc.repo.layout import ModelDir, ensure_repo, hidden_version, writer_alive
from aimass_hpc.repo.oserrors import os_errors
from aimass_hpc.repo.records import Checkpoint, GcReport, VerifyReport, Version
from aimass_hpc.repo.refs import Ref, check_alias, check_name, parse_ref

if TYPE_CHECKING:
    from aimass_hpc.repo import reshard

# Test hook: called with the name of each step of a save ("claimed", "layout-written",
# "data-written", "file-synced", "sidecar-written", "renamed", "committed") and of a delete
# ("delete-unpublished", "delete-unlinked"). The crash tests SIGKILL a child here to prove
# every step leaves a consistent repository.
STAGE_HOOK: Callable[[str], None] | None = None

_HISTORY_LIMIT = 1000
Range = tuple[float | None, float | None]


def _stage(name: str) -> None:
    if STAGE_HOOK is not None:
        STAGE_HOOK(name)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic GC while we build thousands of small objects (one per tensor).

    In a process holding a large heap (a training job) every full collection walks all of
    it; a save of a few thousand tensors would trigger several, costing more than the save.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class ModelRepository:
    """A directory of versioned models on a (parallel) filesystem.

    Safe for many concurrent writers on many nodes without a lock server, and for readers
    on read-only mounts. See the module docs of :mod:`aimass_hpc.repo.layout`.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(path).expanduser().absolute()
        with os_errors(f"opening model repository {self.root}"):
            ensure_repo(self.root, create)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    # ----------------------------------------------------------------------------- saving

    def save(
        self,
        name: str,
        state_dict: Mapping[str, Any] | None,
        *,
        optimizer: Any = None,
        extra: Any = None,
        metrics: Mapping[str, float] | None = None,
        tags: Iterable[str] | None = None,
        parent: str | int | Version | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        flops_per_sample: float | None = None,
        peak_memory_bytes: int | None = None,
        description: str | None = None,
        recipe: Mapping[str, Any] | None = None,
        run: Mapping[str, Any] | None = None,
        contents: Iterable[str] | None = None,
        alignment: int = 1 << 20,
        model_type: str | None = None,
        kind: str | None = None,
        param_count: int | None = None,
    ) -> Version:
        """Save a new version of ``name`` and return it once it is committed and durable.

        ``state_dict`` maps names to tensors (or numpy arrays); ``optimizer`` is an optimizer
        state dict and ``extra`` any nested structure a resumed job needs (RNG states,
        sampler position, scheduler state). All three come back exactly from :meth:`load`.
        ``parent`` (a ref, a version number of the same model, or a Version) records
        lineage; ``recipe`` tells serving how to rebuild the model; ``alignment`` is the
        byte alignment of large tensors in the file (the filesystem's stripe size).
        ``flops_per_sample``/``peak_memory_bytes``/``model_type`` (one of
        :data:`~aimass_hpc.repo.metadata.MODEL_TYPES`) describe the model's cost and purpose
        for :meth:`search` (see :mod:`aimass_hpc.runtime.model_stats`). ``kind`` overrides
        the kind derived from the contents (``"hf"``: a Hugging Face directory, repo/hf.py);
        ``param_count`` the count derived from the model's tensors (where the weights are
        stored as files, not tensors).
        """
        check_name(name)
        with _gc_paused():
            return self._save(
                name,
                state_dict,
                optimizer,
                extra,
                contents,
                alignment,
                metrics=metrics,
                tags=tags,
                parent=parent,
                hyperparameters=hyperparameters,
                flops_per_sample=flops_per_sample,
                peak_memory_bytes=peak_memory_bytes,
                description=description,
                recipe=recipe,
                run=run,
                model_type=model_type,
                kind=kind,
                param_count=param_count,
            )

    def _save(
        self,
        name: str,
        state_dict: Any,
        optimizer: Any,
        extra: Any,
        contents: Iterable[str] | None,
        alignment: int,
        **user: Any,
    ) -> Version:
        meta = self._user_metadata(name, **user)
        trees, pool = encode_sections(state_dict, optimizer, extra)
        meta["contents"] = _contents(state_dict, optimizer, extra, contents)
        meta["kind"] = user.get("kind") or (
            "model" if meta["contents"] == ["model"] else "checkpoint"
        )
        meta.update(_tensor_stats(pool))
        if user.get("param_count") is not None:
            meta["param_count"] = metadata.check_number(
                user["param_count"], "param_count", integer=True
            )
        md = ModelDir(self.root, name)
        with os_errors(f"saving model {name} in {self.root}"):
            md.check_confined()
            number = md.allocate()
            _stage("claimed")
            meta.update(name=name, version=number, alignment=alignment)
            return self._publish(md, number, pool, trees, meta, alignment)

    def _publish(
        self,
        md: ModelDir,
        number: int,
        pool: TensorPool,
        trees: dict[str, Any],
        meta: dict[str, Any],
        alignment: int,
    ) -> Version:
        """Write the file under a temp name, fsync, sidecar, rename (= commit), dir fsync."""
        tmp = md.temp(number)
        committed = False
        sidecar: dict[str, Any] = {}
        writer = _Background()

        def laid_out(size: int) -> None:
            # The file's size is final once HDF5 has laid it out; the sidecar (a cache of the
            # metadata, listed only once the .h5 is renamed) is written while the data go in.
            sidecar.update(meta, file_size=size)
            writer.start(atomic_write_json, md.sidecar(number), sidecar)

        try:
            try:
                h5format.write_file(
                    tmp,
                    pool=pool,
                    trees=trees,
                    metadata=meta,
                    alignment=alignment,
                    stage=_stage,
                    laid_out=laid_out,
                )
            finally:
                writer.join()
            _stage("sidecar-written")
            os.rename(tmp, md.h5(number))
            committed = True
            _stage("renamed")
            fsync_dir(md.versions)
            _stage("committed")
        except BaseException:
            # Nothing half-visible stays behind: the number stays claimed, never reused.
            if not committed:
                for leftover in (tmp, md.sidecar(number)):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            raise
        return Version(md.name, number, md.h5(number), sidecar)

    def _user_metadata(self, name: str, **kw: Any) -> dict[str, Any]:
        meta = metadata.environment()
        meta.update(
            format=h5format.FORMAT_VERSION,
            metrics=metadata.check_metrics(kw["metrics"]),
            tags=metadata.check_tags(kw["tags"]),
            parent=self._parent_ref(name, kw["parent"]),
            hyperparameters=metadata.check_json(
                dict(kw["hyperparameters"] or {}), "hyperparameters"
            ),
            flops_per_sample=metadata.check_number(kw["flops_per_sample"], "flops_per_sample"),
            peak_memory_bytes=metadata.check_number(
                kw["peak_memory_bytes"], "peak_memory_bytes", integer=True
            ),
            description=kw["description"],
            recipe=metadata.check_json(kw["recipe"], "recipe"),
            run=metadata.check_json(kw["run"], "run"),
            model_type=metadata.check_model_type(kw.get("model_type")),
        )
        if meta["description"] is not None and not isinstance(meta["description"], str):
            raise InputError("description must be a string")
        return meta

    def _parent_ref(self, name: str, parent: str | int | Version | None) -> str | None:
        if parent is None:
            return None
        if isinstance(parent, Version):
            return parent.ref
        if isinstance(parent, int) and not isinstance(parent, bool):
            return self.get(Ref(name, version=parent)).ref
        if isinstance(parent, str):
            return self.get(parent).ref  # aliases resolve now: lineage must not move
        raise InputError(f"parent must be a model ref, a version number or a Version: {parent!r}")

    # ------------------------------------------------------------------- sharded checkpoints

    def save_shard(
        self,
        name: str,
        state_dict: Mapping[str, Any] | None,
        *,
        key: str,
        rank: int,
        world_size: int,
        optimizer: Any = None,
        extra: Any = None,
        alignment: int = 1 << 20,
        layout: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write one rank's part of a sharded checkpoint; invisible until :meth:`commit_shards`.

        Every rank calls this with the same ``key`` (unique per checkpoint, e.g.
        ``f"{job_id}-step{step}"``); then one rank, after a barrier, commits the set.
        ``layout`` (parallel sharded checkpoints, see :mod:`aimass_hpc.repo.reshard`) maps a
        tensor's path (``model/fc.weight``, ``optimizer/state.0.exp_avg``) to the
        ``global_shape`` of the whole tensor and the ``offsets`` of this rank's piece in it.
        """
        check_name(name)
        check_name(key, "shard key")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise InputError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        with _gc_paused():
            trees, pool = encode_sections(state_dict, optimizer, extra)
        md = ModelDir(self.root, name)
        meta = {
            "format": h5format.FORMAT_VERSION,
            "kind": "shard",
            "name": name,
            "shard_key": key,
            "rank": rank,
            "world_size": world_size,
            "save_id": os.urandom(8).hex(),
            "contents": _contents(state_dict, optimizer, extra, None),
            **({"layout": _check_layout(layout)} if layout is not None else {}),
            **metadata.environment(),
            **_tensor_stats(pool),
        }
        target = md.shard_dir(key) / _shard_file(rank, world_size)
        with os_errors(f"saving shard {rank} of model {name}"):
            md.check_confined()
            target.parent.mkdir(parents=True, exist_ok=True)
            publish_file(
                target,
                lambda tmp: h5format.write_file(
                    tmp, pool=pool, trees=trees, metadata=meta, alignment=alignment
                ),
            )
        return target

    def commit_shards(
        self, name: str, key: str, *, world_size: int, wait_s: float = 0.0, **kwargs: Any
    ) -> Version:
        """Commit the shards saved under ``key`` as one new version (all ranks must exist).

        Accepts the metadata keywords of :meth:`save` (metrics, tags, parent, recipe, ...).
        ``wait_s``: wait up to that long for the other ranks' shard files to appear (each
        appears whole, by a rename), instead of a barrier: asynchronous saves commit from a
        background thread, which must not make collective calls.
        """
        md = ModelDir(self.root, name)
        sdir = md.shard_dir(key)
        deadline = time.monotonic() + wait_s
        wanted_files = [sdir / _shard_file(r, world_size) for r in range(world_size)]
        while time.monotonic() < deadline and not all(f.exists() for f in wanted_files):
            time.sleep(0.05)
        allowed = {
            "metrics",
            "tags",
            "parent",
            "hyperparameters",
            "flops_per_sample",
            "peak_memory_bytes",
            "description",
            "recipe",
            "run",
            "model_type",
        }
        unknown = set(kwargs) - allowed
        if unknown:
            raise InputError(f"commit_shards got unknown arguments: {', '.join(sorted(unknown))}")
        meta = self._user_metadata(name, **{k: kwargs.get(k) for k in allowed})
        with os_errors(f"committing shards {key} of model {name}"):
            md.check_confined()
            if not sdir.is_dir():
                raise NotFoundError(f"no shards saved under key {key!r} for model {name}")
            present = {p.name for p in sdir.iterdir() if not p.name.startswith(".")}
            wanted = [_shard_file(r, world_size) for r in range(world_size)]
            missing = [str(r) for r, f in enumerate(wanted) if f not in present]
            if missing:
                raise ConflictError(
                    f"cannot commit shards {key!r} of model {name}: missing rank(s) "
                    f"{', '.join(missing)} of {world_size}"
                )
            strays = sorted(present - set(wanted))
            if strays:
                raise ConflictError(
                    f"shards {key!r} of model {name} also hold {strays[0]}: a different world "
                    "size wrote under this key; use a new key"
                )
            for v in self._versions(md):
                if v.metadata.get("shard_key") == key:
                    raise ConflictError(f"shards {key!r} are already committed as {v.ref}")
            shards: list[dict[str, Any]] = []
            contents: list[str] = []
            stats: Counter[str] = Counter()
            for r, fname in enumerate(wanted):
                path = sdir / fname
                cf = h5format.CheckpointFile(path, f"model {name} shard {r}")
                smeta = cf.metadata
                entry = {
                    "rank": r,
                    "file": str(path.relative_to(md.dir)),
                    "size": path.stat().st_size,
                    "save_id": smeta.get("save_id"),
                    # The shard's checksum: a digest of its per-tensor checksums (each tensor's
                    # own is verified as it is read), so a replaced file is caught at open.
                    "checksum": _shard_digest(cf),
                }
                cf.close()
                if "layout" in smeta:
                    entry["layout"] = smeta["layout"]
                shards.append(entry)
                contents += [c for c in smeta.get("contents", []) if c not in contents]
                for k in ("param_count", "tensor_count", "tensor_bytes"):
                    stats[k] += smeta.get(k, 0)
            meta.update(
                kind="sharded",
                contents=contents,
                shard_key=key,
                world_size=world_size,
                shards=shards,
                **stats,
            )
            number = md.allocate()
            meta.update(name=name, version=number)
            return self._publish(md, number, TensorPool(), {}, meta, alignment=4096)

    # ---------------------------------------------------------------------------- reading

    def _model(self, name: str) -> ModelDir:
        md = ModelDir(self.root, name)
        md.check_confined()  # never read through a link out of the repository
        if not md.exists():
            raise NotFoundError(f"unknown model {name!r} in {self.root}")
        return md

    def _resolve(self, ref: str | Ref) -> tuple[ModelDir, int]:
        r = parse_ref(ref)
        md = self._model(r.name)
        if r.version is not None:
            if not md.h5(r.version).exists():
                latest = md.committed()
                hint = f" (latest is {r.name}:{latest[-1]})" if latest else ""
                raise NotFoundError(f"model {r.name} has no version {r.version}{hint}")
            return md, r.version
        if r.alias is not None:
            doc = md.read_alias(r.alias)
            if doc is None:
                known = ", ".join(md.alias_names()) or "none"
                raise NotFoundError(f"model {r.name} has no alias {r.alias!r} (aliases: {known})")
            n = doc["version"]  # a positive int: read_alias checked it
            if not md.h5(n).exists():
                raise NotFoundError(
                    f"alias {r.name}@{r.alias} points to {r.name}:{n}, which was deleted "
                    f"(rollback or promote another version)"
                )
            return md, n
        committed = md.committed()
        if not committed:
            raise NotFoundError(f"model {r.name} has no versions")
        return md, committed[-1]

    def _version(self, md: ModelDir, n: int) -> Version:
        path = md.h5(n)
        try:
            meta = read_json(md.sidecar(n))
            if metadata.stored_problem(meta) is not None:
                raise ValueError("damaged")
        except (OSError, ValueError, RecursionError):
            # No usable sidecar (lost, damaged, written by hand): the file is authoritative.
            label = f"model {md.name}:{n}"
            try:
                meta = h5format.read_metadata(path, label)
            except IntegrityError as exc:
                # Still list it (and let verify/load say what is wrong) rather than hide it.
                meta = {"name": md.name, "version": n, "unreadable": str(exc)}
            else:
                problem = metadata.stored_problem(meta)
                if problem is not None:
                    meta = {
                        "name": md.name,
                        "version": n,
                        "damaged": f"{label}: metadata in {path} is damaged: {problem}",
                    }
        return Version(md.name, n, path, meta)

    def _versions(self, md: ModelDir) -> list[Version]:
        out = []
        for n in md.committed():
            try:
                out.append(self._version(md, n))
            except NotFoundError:
                continue  # deleted while we listed
        return out

    def get(self, ref: str | Ref) -> Version:
        """The version ``ref`` names (metadata only; no tensor is read)."""
        with os_errors(f"reading model {ref}"):
            md, n = self._resolve(ref)
            return self._version(md, n)

    def names(self) -> list[str]:
        """Model names with at least one committed version."""
        with os_errors(f"listing {self.root}"):
            try:
                entries = sorted(os.listdir(self.root / "models"))
            except FileNotFoundError:
                return []
            out = []
            for name in entries:
                try:
                    md = ModelDir(self.root, name)
                except InputError:
                    continue  # not a name we created
                md.check_confined()  # say so, rather than list what lies elsewhere
                if md.committed():
                    out.append(name)
            return out

    def versions(self, name: str) -> list[Version]:
        """All committed versions of ``name``, oldest first."""
        with os_errors(f"listing model {name}"):
            return self._versions(self._model(name))

    def version_numbers(self, name: str) -> list[int]:
        """Committed version numbers of ``name``, ascending (one directory listing)."""
        with os_errors(f"listing model {name}"):
            return self._model(name).committed()

    def latest(self, name: str) -> Version:
        """The newest committed version of ``name``."""
        return self.get(Ref(name))

    def manifest(self, ref: str | Ref) -> list[dict[str, Any]]:
        """The tensor table of a version: name, kind, dtype, shape, nbytes (no tensor reads)."""
        v = self.get(ref)
        with os_errors(f"reading model {v.ref}"):
            files = self._files(v)
            out = []
            for label, path, size in files:
                cf = h5format.CheckpointFile(path, label, expected_size=size)
                for e in cf.manifest:
                    row = {k: e[k] for k in ("name", "kind", "dtype", "shape", "nbytes")}
                    row["checksum"] = f"{int(cf.checksums[e['index']]):016x}"
                    row["stored"] = "packed" if "packed" in e else e["dataset"]
                    if len(files) > 1:
                        row["shard"] = int(label.rsplit(" ", 1)[1])
                    out.append(row)
            return out

    def _files(self, v: Version) -> list[tuple[str, Path, int | None]]:
        """(label, path, expected size) of the file(s) holding a version's tensors."""
        if "damaged" in v.metadata:  # neither sidecar nor file says what the version holds
            raise IntegrityError(str(v.metadata["damaged"]))
        if v.kind != "sharded":
            return [(f"model {v.ref}", v.path, v.metadata.get("file_size"))]
        md = ModelDir(self.root, v.name)
        return [
            (f"model {v.ref} shard {s['rank']}", _shard_path(md, v, s["file"]), s.get("size"))
            for s in v.metadata.get("shards", [])
        ]

    def load(
        self,
        ref: str | Ref,
        *,
        device: str = "cpu",
        mmap: bool = True,
        verify: bool = True,
        shard: int | None = None,
        select: reshard.Select | None = None,
    ) -> Checkpoint:
        """Load a version: tensors mapped from the file (``mmap``), checksums verified.

        ``state_dict`` tensors are moved to ``device``; optimizer and extra tensors stay on
        the CPU (``optimizer.load_state_dict`` and ``torch.set_rng_state`` want that).
        Raises IntegrityError naming the tensor whose checksum fails, or a truncated file.

        A parallel sharded version (shards with a layout) loads as one whole, unsharded
        state dict and optimizer state; ``select(name, global_shape)`` -> ``(offsets,
        shape)`` asks for a region of each laid-out tensor instead (a rank's shard when
        resuming on another world size).
        """
        v = self.get(ref)
        with _gc_paused(), os_errors(f"loading model {v.ref}"):
            files = self._files(v)
            if v.kind != "sharded":
                if shard is not None:
                    raise InputError(f"{v.ref} is not sharded; load it without shard=")
                sd, opt, extra = self._open(files[0], v).load(
                    device=device, mmap=mmap, verify=verify
                )
                return Checkpoint(sd, opt, extra, v)
            if shard is not None:
                if not 0 <= shard < len(files):
                    raise InputError(f"{v.ref} has shards 0..{len(files) - 1}, not {shard}")
                sd, opt, extra = self._open(files[shard], v, shard).load(
                    device=device, mmap=mmap, verify=verify
                )
                return Checkpoint(sd, opt, extra, v, shard=shard)
            layouts = [s.get("layout") for s in v.metadata.get("shards", [])]
            if layouts and all(lay is not None for lay in layouts):
                pieces = [
                    self._open(item, v, r).load(device="cpu", mmap=mmap, verify=verify)
                    for r, item in enumerate(files)
                ]
                from aimass_hpc.repo.reshard import assemble  # torch: only for such loads

                sd, opt, extra = assemble(f"model {v.ref}", pieces, layouts, select)
                if sd is not None and device != "cpu":
                    sd = type(sd)((k, t.to(device)) for k, t in sd.items())
                return Checkpoint(sd, opt, extra, v)
            merged: dict[str, Any] = {}
            opts, extras = [], []
            for r, item in enumerate(files):
                sd, opt, extra = self._open(item, v, r).load(
                    device=device, mmap=mmap, verify=verify
                )
                for k, t in (sd or {}).items():
                    if k in merged:
                        raise InputError(
                            f"{v.ref}: tensor {k!r} is in more than one shard; load one "
                            "rank with shard=RANK"
                        )
                    merged[k] = t
                opts.append(opt)
                extras.append(extra)
            return Checkpoint(merged, opts, extras, v)

    def _open(
        self, item: tuple[str, Path, int | None], v: Version, rank: int | None = None
    ) -> h5format.CheckpointFile:
        label, path, size = item
        cf = h5format.CheckpointFile(path, label, expected_size=size)
        if rank is not None:
            entry = v.metadata["shards"][rank]
            if cf.metadata.get("save_id") != entry.get("save_id") or (
                entry.get("checksum") and entry["checksum"] != _shard_digest(cf)
            ):
                raise IntegrityError(f"{label}: {path} was replaced after the commit")
        return cf

    # -------------------------------------------------------------------------- searching

    def search(
        self,
        name: str = "*",
        *,
        tags: Iterable[str] | str | None = None,
        metrics: Mapping[str, Range] | None = None,
        flops: Range | None = None,
        memory: Range | None = None,
        since: Any = None,
        until: Any = None,
        kind: str | None = None,
        model_type: str | None = None,
    ) -> list[Version]:
        """Versions matching all the given filters, ordered by name then version.

        ``name`` is a glob; ``tags`` must all be present; ``metrics`` maps a metric name to
        an inclusive ``(lo, hi)`` range (None = open); ``flops`` ranges over
        ``flops_per_sample`` and ``memory`` over ``peak_memory_bytes``; ``since``/``until``
        take datetimes, epoch seconds, ISO strings or ages like ``7d``; ``model_type`` is one
        of :data:`~aimass_hpc.repo.metadata.MODEL_TYPES`.
        """
        metadata.check_model_type(model_type, "model type")
        want_tags = set(metadata.check_tags(tags))
        lo_t = metadata.parse_time(since, "since") if since is not None else None
        hi_t = metadata.parse_time(until, "until") if until is not None else None
        ranges = {k: _range(v, f"metric {k}") for k, v in (metrics or {}).items()}
        flops_r = _range(flops, "flops") if flops is not None else None
        mem_r = _range(memory, "memory") if memory is not None else None
        out = []
        for model in self.names():
            if not fnmatch.fnmatchcase(model, name):
                continue
            for v in self.versions(model):
                m = v.metadata
                if want_tags and not want_tags <= set(m.get("tags") or []):
                    continue
                if kind is not None and v.kind != kind:
                    continue
                if model_type is not None and m.get("model_type") != model_type:
                    continue
                if lo_t is not None and v.created_ts < lo_t:
                    continue
                if hi_t is not None and v.created_ts > hi_t:
                    continue
                if flops_r and not _within(m.get("flops_per_sample"), flops_r):
                    continue
                if mem_r and not _within(m.get("peak_memory_bytes"), mem_r):
                    continue
                vm = m.get("metrics") or {}
                if any(not _within(vm.get(k), r) for k, r in ranges.items()):
                    continue
                out.append(v)
        return out

    # ---------------------------------------------------------------------------- aliases

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version number}`` for ``name``; IntegrityError naming a damaged file."""
        md = self._model(name)
        with os_errors(f"reading aliases of {name}"):
            out = {}
            for alias in md.alias_names():
                doc = md.read_alias(alias)
                if doc is not None:
                    out[alias] = doc["version"]
            return out

    def alias_version(self, name: str, alias: str) -> int | None:
        """The version ``name@alias`` points at, None if unset; IntegrityError if damaged."""
        md = self._model(name)
        check_name(alias, "alias")
        with os_errors(f"reading alias {name}@{alias}"):
            doc = md.read_alias(alias)
        return None if doc is None else doc["version"]

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        """The alias's log, oldest first: action, version, previous, at, user, host."""
        md = self._model(name)
        check_name(alias, "alias")
        with os_errors(f"reading alias {name}@{alias}"):
            doc = md.read_alias(alias)
        if doc is None:
            raise NotFoundError(f"model {name} has no alias {alias!r}")
        return list(doc.get("log", []))

    def promote(
        self, name: str, version: int | str | Version, alias: str, *, repair: bool = False
    ) -> Version:
        """Point ``name@alias`` at ``version`` (a number, a ref or a Version): one rename.

        A damaged alias file is an IntegrityError (its history would be lost) unless
        ``repair``: then the file is kept as ``aliases/.<alias>.json.corrupt-<time>`` and
        the new history starts with a ``repair`` entry naming that copy.
        """
        check_alias(alias)
        if isinstance(version, bool):  # an int to Python, but never a version number
            raise InputError(f"version: expected a number or a reference (got {version!r})")
        if isinstance(version, Version):
            target = self.get(version.ref)
        elif isinstance(version, int):
            target = self.get(Ref(name, version=version))
        else:
            target = self.get(version if ":" in version or "@" in version else f"{name}:{version}")
        if target.name != name:
            raise InputError(f"cannot point {name}@{alias} at {target.ref}: another model")
        md = self._model(name)
        with os_errors(f"promoting {target.ref} to {name}@{alias}"):
            doc, problem = md.read_alias_raw(alias)
            fresh: dict[str, Any] = {"alias": alias, "name": name, "stack": [], "log": []}
            if problem is not None:
                if not repair:
                    md.read_alias(alias)  # raises the IntegrityError naming the file
                kept = md.set_aside_alias(alias)
                env = metadata.environment()
                fresh["log"].append(
                    {
                        "action": "repair",
                        "problem": problem,
                        "kept_as": kept.name,
                        "at": env["created"],
                        "user": env["user"],
                        "host": env["host"],
                    }
                )
            doc = doc or fresh
            previous = doc.get("version")
            if previous == target.number:
                return target
            doc["stack"] = (doc.get("stack", []) + [target.number])[-_HISTORY_LIMIT:]
            self._write_alias(md, alias, doc, "promote", target.number, previous)
        return target

    def rollback(self, name: str, alias: str) -> Version:
        """Point ``name@alias`` back at its previous target (repeatable); returns it."""
        md = self._model(name)
        check_name(alias, "alias")
        with os_errors(f"rolling back {name}@{alias}"):
            doc = md.read_alias(alias)
            if doc is None:
                raise NotFoundError(f"model {name} has no alias {alias!r}")
            stack = list(doc.get("stack") or [doc["version"]])
            if len(stack) < 2:
                raise ConflictError(f"alias {name}@{alias} has no previous target to roll back to")
            stack.pop()
            target = stack[-1]
            if not md.h5(target).exists():
                raise ConflictError(
                    f"cannot roll back {name}@{alias}: its previous target {name}:{target} was "
                    "deleted; promote a version instead"
                )
            doc["stack"] = stack
            self._write_alias(md, alias, doc, "rollback", target, doc["version"])
            return self._version(md, target)

    def _write_alias(
        self, md: ModelDir, alias: str, doc: dict[str, Any], action: str, n: int, prev: Any
    ) -> None:
        env = metadata.environment()
        doc["version"] = n
        doc["updated"] = env["created"]
        entry = {
            "action": action,
            "version": n,
            "previous": prev,
            "at": env["created"],
            "user": env["user"],
            "host": env["host"],
        }
        doc["log"] = (doc.get("log", []) + [entry])[-_HISTORY_LIMIT:]
        md.write_alias(alias, doc)

    # ---------------------------------------------------------------- deletion and gc

    def delete(self, ref: str | Ref, *, force: bool = False) -> Version:
        """Delete one version (``name:N`` or ``name@alias``; never a bare name).

        Refuses if an alias points at it unless ``force`` (the alias then dangles until it
        is rolled back or promoted). Readers that have it open or mapped keep working.
        """
        r = parse_ref(ref)
        if r.version is None and r.alias is None:
            raise InputError(
                f"say which version of {r.name} to delete: {r.name}:N or {r.name}@ALIAS"
            )
        v = self.get(r)
        md = self._model(v.name)
        try:
            pointing = sorted(a for a, n in self.aliases(v.name).items() if n == v.number)
        except IntegrityError as exc:
            if not force:
                raise IntegrityError(
                    f"{exc}; cannot tell whether it points at {v.ref}: repair it first, or "
                    "force the delete"
                ) from None
            pointing = []
        if pointing and not force:
            raise ConflictError(
                f"{v.ref} is the target of alias {', '.join(pointing)}: promote another version "
                "first, or force the delete"
            )
        with os_errors(f"deleting {v.ref}"):
            tomb = md.temp(v.number, "deleted")
            try:
                os.rename(md.h5(v.number), tomb)  # un-publish atomically, then clean up
            except FileNotFoundError as exc:
                raise NotFoundError(f"{v.ref} was deleted meanwhile") from exc
            _stage("delete-unpublished")
            fsync_dir(md.versions)
            for path in (md.sidecar(v.number), tomb):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                _stage("delete-unlinked")
            key = v.metadata.get("shard_key")
            if key and not any(o.metadata.get("shard_key") == key for o in self._versions(md)):
                shutil.rmtree(md.shard_dir(key), ignore_errors=True)
            fsync_dir(md.versions)
        return v

    def versions_between(self, name: str, lo: int | None, hi: int | None) -> list[Version]:
        """Committed versions of ``name`` numbered ``lo..hi`` (inclusive; None = open end)."""
        with os_errors(f"listing model {name}"):
            md = self._model(name)
            numbers = [
                n for n in md.committed() if (lo is None or n >= lo) and (hi is None or n <= hi)
            ]
            out = []
            for n in numbers:
                with contextlib.suppress(NotFoundError):  # deleted while we listed
                    out.append(self._version(md, n))
            return out

    def delete_range(
        self,
        name: str,
        lo: int | None,
        hi: int | None,
        *,
        force: bool = False,
        dry_run: bool = False,
    ) -> list[Version]:
        """Delete the versions ``name:lo..hi`` (inclusive, None = open end); return them.

        All or nothing up front: if an alias points into the range the call is refused
        (ConflictError naming the versions and their aliases) before anything is deleted,
        unless ``force``. ``dry_run`` only returns what would go. Each version goes with
        :meth:`delete` (one atomic rename each): a kill midway leaves the rest in place.
        """
        if lo is None and hi is None:
            raise InputError(f"say which versions of {name} to delete: {name}:LO..HI")
        if lo is not None and hi is not None and lo > hi:
            raise InputError(f"empty version range {name}:{lo}..{hi}: the first end is larger")
        chosen = self.versions_between(name, lo, hi)
        span = f"{name}:{'' if lo is None else lo}..{'' if hi is None else hi}"
        if not chosen:
            raise NotFoundError(f"model {name} has no versions in {span}")
        if not force:
            aliased = _aliased(self.aliases(name), {v.number for v in chosen})
            if aliased:
                listed = ", ".join(
                    f"{name}:{n} ({', '.join(a)})" for n, a in sorted(aliased.items())
                )
                raise ConflictError(
                    f"{span} includes aliased version(s) {listed}: promote others first, "
                    "or force the delete"
                )
        if dry_run:
            return chosen
        done = []
        for v in chosen:
            try:
                done.append(self.delete(v.ref, force=force))
            except NotFoundError:
                continue  # deleted meanwhile: the goal is reached
        return done

    def prune(self, name: str, numbers: Iterable[int]) -> list[Version]:
        """Delete versions ``numbers`` of ``name`` that no alias points at; return the deleted.

        For retention (old checkpoints of a run): an aliased version, one whose alias file
        is damaged (we cannot tell where it points) and one already gone are skipped.
        """
        deleted = []
        for n in numbers:
            try:
                deleted.append(self.delete(Ref(name, version=n)))
            except (ConflictError, IntegrityError, NotFoundError):
                continue
        return deleted

    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove what crashed or interrupted writers left behind; committed data is untouched.

        A leftover is removed when its writer is known dead (same host, pid gone) or its
        files are older than ``grace_seconds`` (writers on other nodes).
        """
        report = GcReport(dry_run=dry_run)
        models = self.root / "models"
        with os_errors(f"collecting garbage in {self.root}"):
            names = sorted(os.listdir(models)) if models.is_dir() else []
            for name in names:
                try:
                    md = ModelDir(self.root, name)
                except InputError:
                    continue
                md.check_confined()  # never remove anything outside the repository
                self._gc_model(md, grace_seconds, report)
        return report

    def _gc_model(self, md: ModelDir, grace: float, report: GcReport) -> None:
        committed = set(md.committed())
        now = time.time()

        def remove(path: Path) -> None:
            size = _tree_size(path)
            report.removed.append(str(path))
            report.bytes_freed += size
            if report.dry_run:
                return
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

        if md.versions.is_dir():
            for entry in sorted(os.scandir(md.versions), key=lambda e: e.name):
                path = Path(entry.path)
                n = hidden_version(entry.name)
                mtime = _mtime(path)
                if n is not None:
                    if ".deleted-" in entry.name or not writer_alive(
                        md.claim_info(n), mtime, grace
                    ):
                        remove(path)
                    else:
                        report.kept_in_progress.append(str(path))
                elif (
                    entry.name.endswith(".json")
                    and entry.name[:-5].isascii()
                    and entry.name[:-5].isdigit()
                ):
                    n = int(entry.name[:-5])
                    if n in committed:
                        continue
                    if writer_alive(md.claim_info(n), mtime, grace):
                        report.kept_in_progress.append(str(path))
                    else:
                        remove(path)
        if md.shards.is_dir():
            used = {v.metadata.get("shard_key") for v in self._versions(md)}
            for entry in sorted(os.scandir(md.shards), key=lambda e: e.name):
                path = Path(entry.path)
                newest = max([_mtime(p) for p in path.rglob("*")] + [_mtime(path)])
                if entry.name in used:
                    for p in path.glob(".*.tmp-*"):
                        if now - _mtime(p) >= grace:
                            remove(p)
                elif now - newest >= grace:
                    remove(path)
                else:
                    report.kept_in_progress.append(str(path))
        if md.aliases.is_dir():
            for p in md.aliases.glob(".*.tmp"):
                if now - _mtime(p) >= grace:
                    remove(p)

    # ----------------------------------------------------------------------- verification

    def verify(self, ref: str | Ref) -> VerifyReport:
        """Re-hash every tensor of a version; the report names each tensor that fails."""
        v = self.get(ref)
        report = VerifyReport(ref=v.ref, path=str(v.path), ok=True)
        with os_errors(f"verifying {v.ref}"):
            try:
                files = self._files(v)
            except IntegrityError as exc:
                report.ok = False
                report.error = str(exc).removeprefix(f"model {v.ref}: ")
                return report
            for r, item in enumerate(files):
                label = item[0]
                try:
                    cf = self._open(item, v, r if v.kind == "sharded" else None)
                    n, nbytes, failures = cf.verify()
                except IntegrityError as exc:
                    report.ok = False
                    msg = str(exc).removeprefix(f"{label}: ")
                    report.error = msg if v.kind != "sharded" else f"shard {r}: {msg}"
                    continue
                except NotFoundError as exc:
                    report.ok = False
                    report.error = str(exc).removeprefix(f"{label}: ")
                    continue
                report.tensors += n
                report.bytes += nbytes
                prefix = f"shard {r}: " if v.kind == "sharded" else ""
                report.failures += [prefix + f for f in failures]
            if report.failures:
                report.ok = False
        return report

    # ------------------------------------------------------------------- export / import

    def export(
        self,
        ref: str | Ref,
        path: str | os.PathLike[str],
        format: str = "safetensors",
        *,
        compression: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a version to ``path`` as ``safetensors`` (state dict only), ``torch``
        (``torch.save`` of state dict, optimizer, extra, metadata) or ``hdf5`` (a standalone
        copy, optionally compressed with ``gzip``/``lzf`` for archives)."""
        from aimass_hpc.repo import portable

        ckpt = self.load(ref, mmap=True, verify=True)
        with os_errors(f"exporting {ckpt.version.ref} to {path}"):
            return portable.export(ckpt, Path(path), format, compression, overwrite)

    def import_(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        stats: Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Version:
        """Save a torch (``.pt``), safetensors or exported HDF5 file as a new version of
        ``name``. Keywords are those of :meth:`save` and override stored metadata.

        ``stats(recipe, state_dict)``, called when the import carries a recipe, returns the
        model's measured ``flops_per_sample``/``peak_memory_bytes``/``model_type`` (e.g.
        :func:`aimass_hpc.runtime.model_stats.stats_from_recipe`); given values win.
        """
        from aimass_hpc.repo import portable

        check_name(name)
        with os_errors(f"importing {path}"):
            state_dict, optimizer, extra, meta = portable.read(Path(path))
        merged: dict[str, Any] = {}
        for key in (
            "metrics",
            "tags",
            "hyperparameters",
            "flops_per_sample",
            "peak_memory_bytes",
            "description",
            "recipe",
            "model_type",
        ):
            if meta.get(key) is not None:
                merged[key] = meta[key]
        merged.update(kwargs)
        if stats is not None and merged.get("recipe") and state_dict:
            for key, value in stats(merged["recipe"], state_dict).items():
                if value is not None and merged.get(key) is None:
                    merged[key] = value
        run = dict(merged.pop("run", None) or {})
        run.setdefault("imported_from", str(Path(path).absolute()))
        return self.save(name, state_dict, optimizer=optimizer, extra=extra, run=run, **merged)


class _Background:
    """One function run in a thread; ``join`` re-raises its exception."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # handed to the caller in join()
                self._error = exc

        self._thread = threading.Thread(target=run, name="aimass-sidecar", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _aliased(aliases: Mapping[str, int], numbers: set[int]) -> dict[int, list[str]]:
    """``{version: [alias, ...]}`` for the versions in ``numbers`` an alias points at."""
    out: dict[int, list[str]] = {}
    for alias, n in sorted(aliases.items()):
        if n in numbers:
            out.setdefault(n, []).append(alias)
    return out


def _shard_digest(cf: h5format.CheckpointFile) -> str:
    """A shard's checksum: xxh64 over its tensors' checksums, in manifest order."""
    import xxhash

    return xxhash.xxh64(np.asarray(cf.checksums, dtype="<u8").tobytes()).hexdigest()


def _check_layout(layout: Mapping[str, Any]) -> dict[str, Any]:
    """A shard's layout as JSON: name -> global_shape and offsets (same length, ints >= 0)."""
    out: dict[str, Any] = {}
    for name, entry in layout.items():
        g = [int(x) for x in entry["global_shape"]]
        o = [int(x) for x in entry["offsets"]]
        if len(g) != len(o) or any(x < 0 for x in g + o):
            raise InputError(f"layout of {name!r}: offsets {o} do not fit global shape {g}")
        out[str(name)] = {"global_shape": g, "offsets": o}
    return out


def _shard_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.h5"


def _shard_path(md: ModelDir, v: Version, file: str) -> Path:
    """The shard file a sharded version's metadata names, confined to its shard directory.

    The metadata is data on a shared filesystem, not trusted: an absolute path, ``..``, or
    a symbolic link leading out of ``shards/<key>/`` is an IntegrityError naming the version.
    """
    key = v.metadata.get("shard_key")
    bad = f"{v.ref}: invalid shard key {key!r} in its metadata"
    if not isinstance(key, str):
        raise IntegrityError(bad)
    try:
        sdir = md.shard_dir(key)
    except InputError:
        raise IntegrityError(bad) from None
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:2] != ("shards", key):
        raise IntegrityError(
            f"{v.ref}: shard path {file!r} is not inside the version's shard directory "
            f"shards/{key}/"
        )
    path = md.dir / rel
    inside = os.path.realpath(sdir)
    real = os.path.realpath(path)
    if not real.startswith(inside + os.sep):
        raise IntegrityError(
            f"{v.ref}: shard path {file!r} leads out of its shard directory (to {real})"
        )
    return path


def _contents(
    state_dict: Any, optimizer: Any, extra: Any, contents: Iterable[str] | None
) -> list[str]:
    """What a checkpoint holds, e.g. ``["model", "optimizer", "rng", "data_position"]``."""
    if contents is not None:
        out = [str(c) for c in contents]
        if not all(out):
            raise InputError("contents must be non-empty strings")
        return out
    out = []
    if state_dict is not None:
        out.append("model")
    if optimizer is not None:
        out.append("optimizer")
    if isinstance(extra, Mapping):
        out += [str(k) for k in extra]
    elif extra is not None:
        out.append("extra")
    return out


def _tensor_stats(pool: TensorPool) -> dict[str, Any]:
    """Counts for the metadata; ``param_count`` is the elements of the model's tensors."""
    dtypes: Counter[str] = Counter()
    params = total = 0
    for it in pool.items:
        total += it.nbytes
        if it.kind == "torch" and it.name.startswith("model/"):
            dtypes[str(it.dtype)] += 1  # a torch dtype name (a str) for torch tensors
            params += math.prod(it.shape)
    return {
        "tensor_count": len(pool.items),
        "tensor_bytes": total,
        "param_count": params,
        "dtypes": dict(sorted(dtypes.items())),
    }


def _range(value: Any, what: str) -> Range:
    if isinstance(value, int | float):
        return (value, value)
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise InputError(
            f"{what} range must be (lo, hi) with None for open ends: {value!r}"
        ) from None
    return (lo, hi)


def _within(value: Any, rng: Range) -> bool:
    if value is None:
        return False
    lo, hi = rng
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return time.time()


def _tree_size(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
        return path.lstat().st_size
    except OSError:
        return 0
