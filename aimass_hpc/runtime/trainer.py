"""The built-in data-parallel trainer.

One loop for every backend: fetch this rank's share of the global batch, forward, backward
(the backend averages gradients), step, and at step boundaries: epoch evaluation, periodic
checkpoints, and the preemption vote. Everything that decides what happens next (the sample
order, the step count, the RNG states) is either a pure function of the seed and the step or
saved in the checkpoint, so a run resumed any number of times computes exactly what an
uninterrupted run computes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from aimass_hpc.common import procstat
from aimass_hpc.runtime import model_stats, preempt, rng, sharded
from aimass_hpc.runtime.checkpoint import (
    CheckpointStore,
    HostBuffers,
    PendingSave,
    RepositoryStore,
    SaveInfo,
    TrainState,
    shard_key,
)
from aimass_hpc.runtime.config import TrainParams
from aimass_hpc.runtime.distributed import Backend, LocalBackend
from aimass_hpc.runtime.env import WorldInfo
from aimass_hpc.runtime.metrics import MetricsWriter
from aimass_hpc.runtime.sampler import ShardedBatches, shard_range
from aimass_hpc.runtime.task import TrainTask

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(params: TrainParams, parameters: Any) -> torch.optim.Optimizer:
    """The optimizer named in ``params`` over ``parameters``."""
    name = params.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(
            parameters, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(parameters, lr=params.lr, weight_decay=params.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)
    raise ValueError(f"unknown optimizer {params.optimizer!r}; choose one of {OPTIMIZERS}")


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``i`` (linear warmup, then the schedule)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {SCHEDULES}")

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        span = max(1, total - warmup)
        done = min(1.0, (i - warmup) / span)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * done))
        if schedule == "linear":
            return 1.0 - done
        return 1.0

    return factor


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended."""

    status: str  # "completed" or "stopped" (preemption / time-limit warning)
    step: int
    total_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_ref: str | None = None
    final_ref: str | None = None
    stop_code: int = preempt.STOP_NONE
    resumed_from: str | None = None


class BatchSource:
    """This rank's batches; a TensorDataset is indexed a whole batch at a time (no collate)."""

    def __init__(self, dataset: Dataset[Any], num_workers: int = 0) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.tensors = dataset.tensors if isinstance(dataset, TensorDataset) else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def fetch(self, indices: torch.Tensor) -> Any:
        if self.tensors is not None:
            return tuple(t[indices] for t in self.tensors)
        return default_collate([self.dataset[i] for i in indices.tolist()])

    def iterate(self, index_lists: list[torch.Tensor]) -> Iterator[Any]:
        """Batches for ``index_lists`` in order (worker processes when configured)."""
        if self.tensors is not None or self.num_workers == 0:
            for idx in index_lists:
                yield self.fetch(idx)
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[idx.tolist() for idx in index_lists],
            num_workers=self.num_workers,
        )
        yield from loader


def _cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Train ``task`` with ``params`` on ``backend``; checkpoints go to ``store`` (rank 0)."""

    def __init__(
        self,
        task: TrainTask,
        params: TrainParams,
        *,
        backend: Backend | None = None,
        store: CheckpointStore | None = None,
        metrics: MetricsWriter | None = None,
        warning_signal: str = "USR1",
        lineage: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        requeue_allowed: bool = True,
    ) -> None:
        self.task = task = TrainTask.coerce(task, "task")
        self.params = params
        self.backend = backend or LocalBackend(WorldInfo(), torch.device("cpu"))
        self.store = store
        self.metrics = metrics or MetricsWriter(None, enabled=False)
        self.warning_signal = warning_signal
        self.lineage = lineage or {}
        self.recipe = recipe if recipe is not None else task.recipe
        self.tags = list(tags or [])
        # False once the job used up its restarts: a time-limit warning then only checkpoints.
        self.requeue_allowed = requeue_allowed
        self.device = self.backend.device
        world = self.backend.world
        self.is_main = world.rank == 0
        self.sampler = ShardedBatches(
            num_samples=len(task.train),  # type: ignore[arg-type]
            batch_size=params.batch_size,
            world_size=world.world_size,
            rank=world.rank,
            seed=params.seed,
            shuffle=params.shuffle,
        )
        nb = self.sampler.batches_per_epoch
        self.total_steps = params.steps if params.steps else params.epochs * nb
        self.model = task.model.to(self.device)
        self.optimizer = self.backend.wrap_optimizer(
            make_optimizer(params, self.model.parameters()), self.model
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(params.lr_schedule, params.warmup_steps, self.total_steps)
        )
        # A constant schedule never changes the LR: skip its per-step bookkeeping.
        self._schedule_steps = params.lr_schedule != "constant" or params.warmup_steps > 0
        self.step = 0
        # This epoch's step losses: kept as tensors (no device sync per step), summed in order
        # in float64 on demand so a resumed run adds them up exactly as an uninterrupted one.
        self._loss_base = 0.0
        self._losses: list[torch.Tensor] = []
        self._epoch_batches = 0
        self.last_metrics: dict[str, float] = {}
        self.checkpoint_ref: str | None = None
        self._pending: PendingSave | None = None
        # Seconds the step loop was blocked by each checkpoint (benchmarks/bench_ckpt.py).
        self.checkpoint_stalls: list[float] = []
        # Host memory reused by every asynchronous snapshot (no fresh pages, pinned on GPUs).
        self._host_buffers = HostBuffers()

    # ----------------------------------------------------------------------------- state

    def state(self, buffers: HostBuffers | None = None) -> TrainState:
        """This rank's view of the training state (RNG states of all ranks gathered).

        ``buffers``: snapshot the tensors into these reused host buffers (asynchronous
        saves: valid until the next snapshot) instead of fresh copies.
        """
        rng_states = self.backend.allgather_object(rng.capture())
        epoch, batch = self.sampler.position(self.step)
        global_samples = self.step * self.params.batch_size
        extra = {
            "step": self.step,
            "total_steps": self.total_steps,
            # The data position rule: the step (= global samples consumed / global batch) is
            # what is kept; each rank's share is re-derived for the world size that resumes.
            "sampler": {
                "epoch": epoch,
                "batch": batch,
                "seed": self.params.seed,
                "global_samples": global_samples,
            },
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states,
            "world_size": self.backend.world_size,
            "epoch_loss_sum": self._epoch_loss_sum(),
            "epoch_batches": self._epoch_batches,
            "metrics": dict(self.last_metrics),
        }
        if self.backend.sharded:
            model, optimizer, layout = sharded.local_state(self.model, self.optimizer, buffers)
            return TrainState(model=model, optimizer=optimizer, extra=extra, layout=layout)
        if buffers is not None:
            return TrainState(
                model=buffers.take(self.model.state_dict(), "model/"),
                optimizer=buffers.take(self.optimizer.state_dict(), "optimizer/"),
                extra=extra,
            )
        return TrainState(
            model=_cpu(self.model.state_dict()),
            optimizer=_cpu(self.optimizer.state_dict()),
            extra=extra,
        )

    def load_state(self, state: TrainState) -> None:
        """Continue from ``state`` (the same on every rank)."""
        self.model.load_state_dict(state.model)
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
        extra = state.extra
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step = int(extra["step"])
        self._loss_base = float(extra.get("epoch_loss_sum", 0.0))
        self._losses = []
        self._epoch_batches = int(extra.get("epoch_batches", 0))
        self.last_metrics = dict(extra.get("metrics") or {})
        states = extra.get("rng") or []
        if len(states) == self.backend.world_size:
            rng.restore(states[self.backend.rank])
        else:
            # A different world size cannot continue each rank's stream; reseed reproducibly.
            rng.seed_everything(rng.rank_seed(self.params.seed + self.step, self.backend.rank))
        self.checkpoint_ref = state.ref

    def resume(self) -> str | None:
        """Load this run's newest checkpoint if there is one (rank 0 reads, all receive)."""
        if self.store is None:
            return None
        if self.backend.sharded:
            return self._resume_sharded()
        state = self.store.latest() if self.is_main else None
        state = self.backend.broadcast_object(state) if self.backend.world_size > 1 else state
        if state is None:
            return None
        self.load_state(state)
        return state.ref

    def _resume_sharded(self) -> str | None:
        """Every rank reads its own region of each tensor of the newest checkpoint.

        The checkpoint may come from another world size: each rank asks for the slices
        its own shard covers (resharding), see :mod:`aimass_hpc.runtime.sharded`.
        """
        assert self.store is not None
        ref = self.store.latest_ref() if self.is_main else None
        ref = self.backend.broadcast_object(ref) if self.backend.world_size > 1 else ref
        if ref is None:
            return None
        targets = sharded.Targets(self.model, self.optimizer)
        state = self.store.load_resharded(ref, targets.select)
        for name, entry in (state.layout or {}).items():  # in-memory store: same world
            targets.select(name, tuple(entry["global_shape"]))
        state.model, state.optimizer = targets.restore(state.model, state.optimizer)
        self.load_state(state)
        return state.ref

    def _info(self, kind: str) -> SaveInfo:
        return SaveInfo(
            kind=kind,
            metrics={
                k: float(v)
                for k, v in self.last_metrics.items()
                if v is not None and math.isfinite(float(v))
            },
            hyperparameters=asdict(self.params),
            recipe=self.recipe,
            run={**self.lineage, "step": self.step},
            tags=self.tags,
        )

    def _finish_pending(self) -> None:
        """Wait for the background checkpoint, if one is being written."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        ref = pending.wait()
        if ref:
            self.checkpoint_ref = ref
            self.metrics.log("event", event="checkpoint", step=pending.step, ref=ref)

    def save(self, *, wait: bool = False) -> str | None:
        """Checkpoint now (collective: every rank contributes its RNG state); rank 0 writes.

        With ``async_checkpoint`` (and a repository) only the snapshot to host memory happens
        here; the write and the commit run in the background and this returns None. A save
        first waits for the previous background one; ``wait`` makes this one synchronous
        (the end of training, a stop signal: the save completes before the job exits).
        """
        started = time.perf_counter()
        try:
            return self._save(wait)
        finally:
            self.checkpoint_stalls.append(time.perf_counter() - started)

    def _save(self, wait: bool) -> str | None:
        self._finish_pending()  # before the snapshot: its buffers are the pending save's
        asynchronous = (
            self.params.async_checkpoint and not wait and isinstance(self.store, RepositoryStore)
        )
        state = self.state(self._host_buffers if asynchronous else None)
        if asynchronous:
            info = self._info("checkpoint")
            store = self.store
            assert isinstance(store, RepositoryStore)  # checked above; for the type checker
            if self.backend.sharded:
                key = shard_key(self.step) if self.is_main else None
                key = self.backend.broadcast_object(key)
                rank, world = self.backend.rank, self.backend.world_size

                def job() -> str | None:
                    return store.save_pieces_then_commit(state, info, key, rank, world, 600.0)

            elif self.is_main:

                def job() -> str | None:
                    return store.save(state, info)

            else:
                return None
            self._pending = PendingSave(job, self.step)
            return None
        if self.backend.sharded and self.store is not None:
            # Every rank writes its own pieces at once; rank 0 commits the set.
            ref = self.store.save_sharded(state, self._info("checkpoint"), self.backend)
            self.checkpoint_ref = ref
            if self.is_main:
                self.metrics.log("event", event="checkpoint", step=self.step, ref=ref)
            return ref
        if not self.is_main or self.store is None:
            return None
        ref = self.store.save(state, self._info("checkpoint"))
        self.checkpoint_ref = ref
        self.metrics.log("event", event="checkpoint", step=self.step, ref=ref)
        return ref

    def save_final(self) -> str | None:
        """The final model (weights, metrics, recipe, lineage) as a new version; rank 0 only.

        Idempotent across restarts: a run that already saved its final model reuses it.
        With a sharded backend (FSDP) it is collective and saved in parallel, one piece per
        rank; it loads unsharded (``ModelRepository.load``) for serving and export.
        """
        self._finish_pending()
        if self.backend.sharded:
            return self._save_final_sharded()
        if not self.is_main or self.store is None:
            return None
        existing = self.store.latest_ref("final")
        if existing:
            return existing
        weights = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}
        return self.store.save(TrainState(model=weights), self._final_info())

    def _save_final_sharded(self) -> str | None:
        if self.store is None:
            return None
        existing = self.store.latest_ref("final") if self.is_main else None
        existing = self.backend.broadcast_object(existing)
        if existing:
            return existing if self.is_main else None
        model, _, layout = sharded.local_state(self.model, None)
        info = self._final_info()  # collective for a sharded model: every rank measures
        ref = self.store.save_sharded(TrainState(model=model, layout=layout), info, self.backend)
        return ref if self.is_main else None

    def _final_info(self) -> SaveInfo:
        """The final version's description, with the whole model's cost and type measured on
        one sample (a forward pass: every rank of a sharded model must call this)."""
        info = self._info("final")
        sample = model_stats.sample_input(self.recipe)
        if sample is None:
            sample = model_stats.sample_from_dataset(self.task.train)
        stats = model_stats.measure(self.model, sample, self.device)
        info.flops_per_sample = stats.flops_per_sample
        info.peak_memory_bytes = stats.peak_memory_bytes
        info.model_type = model_stats.model_type_of(
            declared=self.task.model_type,
            recipe=self.recipe,
            loss=self.task.loss,
            model=self.model,
            sample=sample,
        )
        return info

    # ------------------------------------------------------------------------------ loop

    def evaluate(self) -> dict[str, float]:
        """Validation loss and metrics over the whole val set (sharded over ranks)."""
        if self.task.val is None:
            return {}
        source = BatchSource(self.task.val)
        shard = shard_range(len(source), self.backend.world_size, self.backend.rank)
        names = ["val_loss", *self.task.metrics]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        self.model.eval()
        step = max(1, self.sampler.local_batch_size)
        starts = list(range(shard.start, shard.stop, step))
        rounds = len(starts)
        if self.backend.sharded:
            # A sharded forward is collective: every rank runs as many as the busiest one.
            rounds = self.backend.allreduce_max(rounds)
        with torch.no_grad():
            for i in range(rounds):
                if i >= len(starts):
                    self.model(_to(source.fetch(torch.arange(1)), self.device)[0])
                    continue
                start = starts[i]
                idx = torch.arange(start, min(start + step, shard.stop))
                x, y = _to(source.fetch(idx), self.device)
                out = self.model(x)
                n = len(idx)
                values = [
                    self.task.loss(out, y),
                    *(fn(out, y) for fn in self.task.metrics.values()),
                ]
                for i, v in enumerate(values):
                    sums[i] += float(v) * n
                sums[-1] += n
        self.model.train()
        sums = self.backend.allreduce_sum(sums)
        count = float(sums[-1])
        return {name: float(sums[i]) / count for i, name in enumerate(names)} if count else {}

    def _epoch_loss_sum(self) -> float:
        total = self._loss_base
        if self._losses:
            for value in torch.stack(self._losses).to("cpu", torch.float64).tolist():
                total += value
        return total

    def _epoch_end(self, epoch: int) -> None:
        loss_sum = torch.tensor([self._epoch_loss_sum(), float(self._epoch_batches)])
        loss_sum = self.backend.allreduce_sum(loss_sum)
        record = {"train_loss": float(loss_sum[0] / loss_sum[1].clamp(min=1.0))}
        record.update(self.evaluate())
        self.last_metrics = record
        self._loss_base = 0.0
        self._losses = []
        self._epoch_batches = 0
        self.metrics.log("epoch", step=self.step, epoch=epoch + 1, **record)

    def _complete(self, resumed: str | None, at_end: bool = False) -> FitResult:
        """End of training: last epoch metrics, end checkpoint, final model."""
        if not at_end:
            if not self.last_metrics or self._epoch_batches:
                self._epoch_end(self.sampler.position(self.step - 1)[0])
            self.save(wait=True)
        final = self.save_final()
        self.metrics.log("event", event="done", step=self.step, ref=final)
        self.metrics.flush()
        return FitResult(
            "completed",
            self.step,
            self.total_steps,
            self.last_metrics,
            self.checkpoint_ref,
            final,
            resumed_from=resumed,
        )

    def _settle_buckets(self, train_model: nn.Module, source: BatchSource) -> None:
        """One throw-away forward/backward so DDP fixes its gradient buckets before step 1.

        DDP regroups gradients after its first backward (in the order they became ready).
        Where an element sits in a bucket decides the order in which the ranks' values are
        summed, so without this a resumed job (whose first step is a later step) would round
        differently from an uninterrupted one. No weights change: gradients are dropped, and
        RNG states and buffers (BatchNorm statistics) are put back.
        """
        saved_rng = rng.capture()
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        x, y = _to(source.fetch(self.sampler.local_indices(self.sampler.order(0), 0)), self.device)
        self.task.loss(train_model(x), y).backward()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(buffers[name])
        rng.restore(saved_rng)

    def _agree_stop(self) -> int:
        vote = preempt.local_stop_code(self.warning_signal)
        return self.backend.allreduce_max(vote) if self.backend.world_size > 1 else vote

    def fit(self) -> FitResult:
        """Train to the end, or until a stop signal; checkpoint accordingly."""
        rng.seed_everything(rng.rank_seed(self.params.seed, self.backend.rank))
        resumed = self.resume()
        # How long this rank took to get here (imports, process group, task, resume): the
        # start-up share of time-to-first-step, which users of a queue care about.
        startup = procstat.age_s()
        startup_s = None if startup is None else round(startup, 2)
        if resumed:
            self.metrics.log(
                "event", event="resume", step=self.step, ref=resumed, startup_s=startup_s
            )
        else:
            self.metrics.log(
                "event", event="start", step=0, total_steps=self.total_steps, startup_s=startup_s
            )
        if resumed and self.step >= self.total_steps:
            return self._complete(resumed, at_end=True)
        train_model = self.backend.wrap_model(self.model)
        self.model.train()
        source = BatchSource(self.task.train, self.params.num_workers)
        if train_model is not self.model:
            self._settle_buckets(train_model, source)
        nb = self.sampler.batches_per_epoch
        global_batch = self.params.batch_size
        clip = self.params.grad_clip
        every = self.params.checkpoint_every
        stop = preempt.STOP_NONE
        on_cpu = self.device.type == "cpu"  # batches are already there: skip .to() calls
        last_t = time.perf_counter()
        while self.step < self.total_steps:
            epoch, first = self.sampler.position(self.step)
            order = self.sampler.order(epoch)
            last = min(nb, first + (self.total_steps - self.step))
            indices = [self.sampler.local_indices(order, b) for b in range(first, last)]
            for b, batch in zip(range(first, last), source.iterate(indices), strict=True):
                x, y = batch if on_cpu else _to(batch, self.device)
                self.optimizer.zero_grad()  # set_to_none by default; Horovod takes no args
                loss = self.task.loss(train_model(x), y)
                loss.backward()
                if clip:
                    self.backend.clip_and_step(self.optimizer, self.model.parameters(), clip)
                else:
                    self.optimizer.step()
                if self._schedule_steps:
                    self.scheduler.step()
                self.step += 1
                loss = loss.detach()
                self._losses.append(loss)
                self._epoch_batches += 1
                now = time.perf_counter()
                self.metrics.log(
                    "step",
                    step=self.step,
                    epoch=epoch + 1,
                    loss=loss,
                    lr=self.scheduler.get_last_lr()[0],
                    samples_per_s=global_batch / max(now - last_t, 1e-9),
                )
                last_t = now
                if b == nb - 1:
                    self._epoch_end(epoch)
                stop = self._agree_stop()
                if self.step >= self.total_steps:
                    break
                if stop or (every and self.step % every == 0):
                    # At a stop signal the pending save completes and this one is synchronous.
                    self.save(wait=bool(stop))
                    last_t = time.perf_counter()  # don't count the checkpoint as a slow step
                if stop == preempt.STOP_WARN and not self.requeue_allowed:
                    # No restart left: keep the checkpoint just made and train on; the job
                    # may still finish before the limit (else Slurm ends it, progress saved).
                    self.metrics.log("event", event="warning_ignored", step=self.step)
                    preempt.reset()
                    stop = preempt.STOP_NONE
                if stop:
                    break
            if stop:
                break
        self._finish_pending()
        if self.step >= self.total_steps:
            return self._complete(resumed)
        self.metrics.log("event", event="stopped", step=self.step, signals=preempt.received())
        self.metrics.flush()
        return FitResult(
            "stopped",
            self.step,
            self.total_steps,
            self.last_metrics,
            self.checkpoint_ref,
            None,
            stop_code=stop,
            resumed_from=resumed,
        )
