"""Checkpoints of a run: saved into the model repository, found again after a restart.

A checkpoint is a repository version of the run's model whose ``extra`` holds everything
beyond weights and optimizer that resume needs (scheduler, step, sampler position, every
rank's RNG states). After each successful save rank 0 appends the version's ref to
``<run_dir>/checkpoints.jsonl``; a requeued job resumes from that file's last entry, so it
always picks the newest checkpoint of *its own* run, never another run's version of the same
model.

Retention (``keep``, the spec's ``[train] keep_checkpoints`` or the site's
``training.keep_checkpoints``): after each checkpoint save rank 0 deletes this run's older
checkpoints beyond the newest ``keep``. Final models, versions an alias points at, the newest
checkpoint (the one a restart resumes from) and other runs' versions are never deleted. Each
deletion is the repository's own atomic delete, recorded afterwards as a ``pruned`` line in
the index, so a kill at any instant leaves a consistent repository and a later prune finishes
the job.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimass_hpc.common import fsutil

INDEX_FILE = "checkpoints.jsonl"


@dataclass
class TrainState:
    """One checkpoint: weights, optimizer state and the trainer's own state in ``extra``."""

    model: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ref: str | None = None
    # Parallel sharded state (FSDP): ``model``/``optimizer`` hold this rank's pieces and
    # this maps each piece's name to the tensor's global shape and the piece's offsets.
    layout: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return int(self.extra.get("step", 0))


@dataclass
class SaveInfo:
    """Lineage and description attached to a saved version."""

    kind: str = "checkpoint"  # or "final"
    metrics: dict[str, float] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    run: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    # Cost of the model (final versions): see aimass_hpc.runtime.model_stats.
    flops_per_sample: float | None = None
    peak_memory_bytes: int | None = None
    model_type: str | None = None  # classifier, regressor, language-model, ...


class CheckpointStore(ABC):
    """Where a run's checkpoints go. Only rank 0 calls :meth:`save`."""

    def __init__(
        self, run_dir: str | Path | None, keep: int | None = None, resume_from: Any = None
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep_checkpoints must be a positive integer, got {keep!r}")
        self.keep = keep  # None: keep every checkpoint
        # Another run's directory: its newest checkpoint starts this run while this run has
        # none of its own (resume on another world size in a new job).
        self.resume_from = Path(resume_from) if resume_from else None

    @abstractmethod
    def _save(self, state: TrainState, info: SaveInfo, parent: str | None) -> str:
        """Persist ``state`` and return its ref."""

    @abstractmethod
    def load(self, ref: str) -> TrainState:
        """Read the checkpoint ``ref``."""

    @abstractmethod
    def _delete(self, refs: list[str]) -> list[str]:
        """Delete the versions ``refs`` unless an alias points at them; the refs now gone."""

    def save(self, state: TrainState, info: SaveInfo) -> str:
        """Save ``state`` as a new version whose parent is this run's previous checkpoint.

        A final model (``info.kind == "final"``) holds only weights; its parent is the last
        checkpoint, which holds everything needed to continue training from it.
        """
        parent = self.latest_ref()
        ref = self._save(state, info, parent)
        self._record(ref, int(info.run.get("step", state.step)), info.kind, parent)
        if info.kind == "checkpoint":
            self.prune()
        return ref

    def prune(self) -> list[str]:
        """Delete this run's checkpoints older than the newest ``keep``; the refs deleted.

        Never a final model, an aliased version, the newest checkpoint or another run's
        version. A deletion is recorded after it happened: a kill in between only makes the
        next prune find the version already gone.
        """
        if self.keep is None:
            return []
        saved = [e["ref"] for e in self.history() if e.get("kind") == "checkpoint"]
        protect = set(saved[-self.keep :]) | {self.latest_ref(), self.latest_ref("final")}
        gone = self.pruned()
        old = [r for r in saved[: -self.keep] if r not in protect and r not in gone]
        if not old:
            return []
        deleted = self._delete(old)
        for ref in deleted:
            self._append({"ref": ref, "kind": "pruned"})
        return deleted

    def _entries(self) -> list[dict[str, Any]]:
        if self.run_dir is None:
            return self._memory_index
        return fsutil.read_json_lines(self.run_dir / INDEX_FILE)

    def history(self) -> list[dict[str, Any]]:
        """This run's saved checkpoints and final models, oldest first."""
        return [e for e in self._entries() if e.get("kind") != "pruned"]

    def pruned(self) -> set[str]:
        """Refs of this run's checkpoints that retention deleted."""
        return {e["ref"] for e in self._entries() if e.get("kind") == "pruned"}

    def latest_ref(self, kind: str = "checkpoint") -> str | None:
        """Ref of this run's newest version of ``kind`` ("checkpoint" or "final"), if any.

        A run with no checkpoint of its own and a ``resume_from`` run directory gets that
        run's newest checkpoint.
        """
        for entry in reversed(self.history()):
            if entry.get("kind") == kind:
                return entry["ref"]
        if kind == "checkpoint" and self.resume_from is not None:
            other = fsutil.read_json_lines(self.resume_from / INDEX_FILE)
            gone = {e["ref"] for e in other if e.get("kind") == "pruned"}
            for entry in reversed(other):
                if entry.get("kind") == kind and entry["ref"] not in gone:
                    return str(entry["ref"])
        return None

    # ------------------------------------------------------------ parallel sharded saves

    def save_sharded(self, state: TrainState, info: SaveInfo, comm: Any) -> str | None:
        """Collective: every rank writes its pieces at once; rank 0 then commits the set.

        ``comm`` is the runtime's Backend (rank, world_size, barrier, broadcast_object).
        Returns the new ref on every rank. Nothing is visible before the commit: a crash
        while writing leaves the previous checkpoint the newest one.
        """
        rank, world = comm.rank, comm.world_size
        key = shard_key(state.step) if rank == 0 else None
        key = comm.broadcast_object(key)
        failure = None
        try:
            self._save_piece(state, key, rank, world)
        except Exception as exc:  # every rank must reach the vote below, or all would hang
            failure = f"rank {rank}: {exc}"
        failures = [f for f in comm.allgather_object(failure) if f]
        if failures:
            raise RuntimeError(f"sharded checkpoint {key} failed: {failures[0]}")
        ref = None
        if rank == 0:
            parent = self.latest_ref()
            ref = self._commit(key, world, info, parent)
            self._record(ref, int(info.run.get("step", state.step)), info.kind, parent)
            if info.kind == "checkpoint":
                self.prune()
        return comm.broadcast_object(ref)

    def save_pieces_then_commit(
        self, state: TrainState, info: SaveInfo, key: str, rank: int, world: int, wait_s: float
    ) -> str | None:
        """Write this rank's pieces; rank 0 then waits for the others' and commits.

        No collective call: this runs in a background thread (asynchronous checkpoints).
        The ref on rank 0, None elsewhere.
        """
        self._save_piece(state, key, rank, world)
        if rank != 0:
            return None
        parent = self.latest_ref()
        ref = self._commit(key, world, info, parent, wait_s=wait_s)
        self._record(ref, int(info.run.get("step", state.step)), info.kind, parent)
        if info.kind == "checkpoint":
            self.prune()
        return ref

    def _save_piece(self, state: TrainState, key: str, rank: int, world: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot save sharded checkpoints")

    def _commit(
        self, key: str, world: int, info: SaveInfo, parent: str | None, wait_s: float = 0.0
    ) -> str:
        raise NotImplementedError(f"{type(self).__name__} cannot save sharded checkpoints")

    def load_resharded(self, ref: str, select: Any) -> TrainState:
        """This rank's pieces of the checkpoint ``ref`` (``select``: see ModelRepository.load)."""
        return self.load(ref)

    def latest(self) -> TrainState | None:
        """The newest checkpoint of this run, loaded, or None on a fresh start."""
        ref = self.latest_ref()
        return self.load(ref) if ref else None

    @property
    def _memory_index(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_index"):
            self._index: list[dict[str, Any]] = []
        return self._index

    def _record(self, ref: str, step: int, kind: str, parent: str | None) -> None:
        self._append({"ref": ref, "step": step, "kind": kind, "parent": parent})

    def _append(self, entry: dict[str, Any]) -> None:
        if self.run_dir is None:
            self._memory_index.append(entry)
        else:
            fsutil.append_line(self.run_dir / INDEX_FILE, json.dumps(entry))


class HostBuffers:
    """Reusable host memory for checkpoint snapshots: the stall of an asynchronous save.

    An asynchronous save blocks the step loop only to copy the state to host memory. Copying
    into fresh tensors costs more than the copy: every new page is faulted in and zeroed by
    the kernel (a 192 MB Adam state: ~70 ms fresh vs ~20 ms into reused buffers), and for
    CUDA tensors a new pinned (page-locked) buffer costs more than the transfer itself. Here
    each tensor is copied (``copy_``) into the buffer kept from the previous snapshot of the
    same path (reallocated only when its shape or dtype changed); buffers of CUDA tensors
    are pinned and filled with non-blocking copies, synchronised once at the end.

    A snapshot stays valid until the next one: take the next only after the previous one was
    written (the trainer waits for the pending save first). Later optimizer steps do not
    change a snapshot (it is a copy, not a view).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}
        self._cuda = False

    def copy(self, tensor: Any, path: str) -> Any:
        """``tensor``'s values in this path's host buffer (call :meth:`sync` before reading)."""
        src = tensor.detach()
        if src.layout != _strided() or src.is_meta:
            return src.to("cpu", copy=True)  # sparse and others: a plain copy
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            import torch

            on_gpu = src.device.type == "cuda"
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=on_gpu)
            self._buffers[path] = buf
        non_blocking = src.device.type == "cuda"
        self._cuda = self._cuda or non_blocking
        buf.copy_(src, non_blocking=non_blocking)
        return buf

    def sync(self) -> None:
        """Wait for the non-blocking device-to-host copies issued since the last sync."""
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self._cuda = False

    def take(self, obj: Any, path: str) -> Any:
        """A copy of the (nested) state ``obj`` with every tensor in a reused host buffer."""
        out = self._walk(obj, path)
        self.sync()
        return out

    def _walk(self, obj: Any, path: str) -> Any:
        from aimass_hpc.repo.codec import _child

        if _is_tensor(obj):
            return self.copy(obj, path)
        if isinstance(obj, dict):
            return {k: self._walk(v, _child(path, k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._walk(v, _child(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self._walk(v, _child(path, i)) for i, v in enumerate(obj))
        return obj

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _is_tensor(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.Tensor)


def _strided() -> Any:
    import torch

    return torch.strided


class PendingSave:
    """One checkpoint being written and committed by a background thread.

    The step loop has already snapshotted the state to host memory; the thread writes it
    (and, on rank 0, commits and records it). :meth:`wait` joins it and re-raises its error.
    Not a daemon thread: an interpreter that exits normally finishes the save first.
    """

    def __init__(self, fn: Any, step: int) -> None:
        import threading

        self.step = step
        self.ref: str | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="aimass-checkpoint")
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.ref = fn()
        except BaseException as exc:  # handed to the step loop by wait()
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> str | None:
        """The saved ref (rank 0; None elsewhere) once the background save has finished."""
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(
                f"checkpoint of step {self.step} failed: {self.error}"
            ) from self.error
        return self.ref


def shard_key(step: int) -> str:
    """A fresh key for one sharded checkpoint (rank 0 draws it, every rank uses it)."""
    import os

    return f"s{step}-{os.urandom(4).hex()}"


class RepositoryStore(CheckpointStore):
    """Checkpoints as versions of ``model_name`` in a :class:`ModelRepository`.

    ``keep`` None means the run config's ``keep_checkpoints`` (``<run_dir>/train.json``),
    else every checkpoint is kept.
    """

    def __init__(
        self,
        repository: str | Path,
        model_name: str,
        run_dir: str | Path | None,
        keep: int | None = None,
        resume_from: str | Path | None = None,
    ):
        super().__init__(run_dir, keep, resume_from)
        self.repository = Path(repository)
        self.model_name = model_name
        self._repo: Any = None

    @property
    def repo(self) -> Any:
        """The repository, opened on first use: only rank 0 ever touches it."""
        if self._repo is None:
            from aimass_hpc.repo import ModelRepository

            self._repo = ModelRepository(self.repository)
        return self._repo

    def _save(self, state: TrainState, info: SaveInfo, parent: str | None) -> str:
        version = self.repo.save(
            self.model_name,
            state.model,
            optimizer=state.optimizer,
            extra=state.extra or None,
            **_version_metadata(info, parent),
        )
        return str(version.ref)

    def _delete(self, refs: list[str]) -> list[str]:
        from aimass_hpc.repo.refs import Ref

        numbers = []
        for ref in refs:
            r = Ref.parse(ref)
            if r.name == self.model_name and r.version is not None:
                numbers.append(r.version)
        return [v.ref for v in self.repo.prune(self.model_name, numbers)]

    def _save_piece(self, state: TrainState, key: str, rank: int, world: int) -> None:
        self.repo.save_shard(
            self.model_name,
            state.model,
            key=key,
            rank=rank,
            world_size=world,
            optimizer=state.optimizer,
            extra=(state.extra or None) if rank == 0 else None,
            layout=state.layout or {},
        )

    def _commit(
        self, key: str, world: int, info: SaveInfo, parent: str | None, wait_s: float = 0.0
    ) -> str:
        version = self.repo.commit_shards(
            self.model_name,
            key,
            world_size=world,
            wait_s=wait_s,
            **_version_metadata(info, parent),
        )
        return str(version.ref)

    def load_resharded(self, ref: str, select: Any) -> TrainState:
        ckpt = self.repo.load(ref, select=select)
        return TrainState(
            model=dict(ckpt.state_dict),
            optimizer=ckpt.optimizer,
            extra=dict(ckpt.extra or {}),
            ref=str(ckpt.version.ref),
        )

    def load(self, ref: str) -> TrainState:
        ckpt = self.repo.load(ref)
        return TrainState(
            model=dict(ckpt.state_dict),
            optimizer=ckpt.optimizer,
            extra=dict(ckpt.extra or {}),
            ref=str(ckpt.version.ref),
        )


class MemoryStore(CheckpointStore):
    """Checkpoints kept in this process (tests and runs without a repository)."""

    def __init__(self, run_dir: str | Path | None = None, keep: int | None = None) -> None:
        super().__init__(run_dir, keep)
        self.saved: dict[str, tuple[TrainState, SaveInfo]] = {}
        self._count = 0

    def _save(self, state: TrainState, info: SaveInfo, parent: str | None) -> str:
        import copy

        self._count += 1  # not len(saved): pruning shrinks it, refs must stay unique
        ref = f"memory:{self._count}"
        self.saved[ref] = (copy.deepcopy(state), info)
        return ref

    def _delete(self, refs: list[str]) -> list[str]:
        return [ref for ref in refs if self.saved.pop(ref, None) is not None]

    def save_sharded(self, state: TrainState, info: SaveInfo, comm: Any) -> str | None:
        """Every rank keeps its own pieces in its own memory (same world size on load)."""
        comm.barrier()
        return self.save(state, info)

    def load(self, ref: str) -> TrainState:
        import copy

        state = copy.deepcopy(self.saved[ref][0])
        state.ref = ref
        return state


def _version_metadata(info: SaveInfo, parent: str | None) -> dict[str, Any]:
    """What a saved version records besides its tensors: one mapping for whole and sharded."""
    return {
        "metrics": info.metrics or None,
        "tags": [info.kind, *info.tags],
        "parent": parent,
        "hyperparameters": info.hyperparameters or None,
        "recipe": info.recipe,
        "run": info.run or None,
        "flops_per_sample": info.flops_per_sample,
        "peak_memory_bytes": info.peak_memory_bytes,
        "model_type": info.model_type,
    }
