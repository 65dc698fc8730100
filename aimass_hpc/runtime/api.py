"""The runtime API for user scripts launched on every rank (``[script]`` specs).

    from aimass_hpc import runtime

    job = runtime.init()                      # every rank connected (ends with a barrier)
    torch.manual_seed(0)                      # same initial weights on every rank
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    job.log_params(lr=0.1, hidden=32)         # the final version's hyperparameters
    net, optimizer = job.wrap(model, optimizer)   # restore into what wrap returns
    state = job.restore(model, optimizer)     # extra dict of the newest checkpoint, or None
    start = state["step"] + 1 if state else 0
    batches = job.sampler(len(data), batch_size=64, seed=0)   # or a DistributedSampler
    for step in range(start, total_steps):
        epoch, b = batches.position(step)
        idx = batches.local_indices(batches.order(epoch), b)  # this rank's share
        ...                                   # forward with net, step optimizer
        job.log_metrics(step, loss=loss)
        if job.should_stop():                 # collective: a preemption/time-limit warning
            job.save_checkpoint(step, model, optimizer)
            job.exit_for_requeue(step=step, total_steps=total_steps)  # never returns
        if step % 100 == 99:
            job.save_checkpoint(step, model, optimizer)
    job.finish(model, metrics={"accuracy": acc},
               recipe={"factory": "mymodels:build", "kwargs": {...}, "input_shape": [4]})

Exact resume: checkpoints carry every rank's RNG states and ``restore`` puts this rank's back;
the sample order above is a pure function of (seed, epoch, batch); the first training forward
after ``wrap`` fixes DDP's gradient buckets (see :func:`settle_buckets_on_first_forward`). A
script that follows this pattern ends, after any number of restarts, with weights bit-for-bit
equal to an uninterrupted run on CPU (docs/script-mode.md says what breaks it).

Start-up and shutdown are collective: :func:`init` returns once every rank is connected, and
the process group is left together (a barrier, then teardown) when the script ends, so a fast
rank never leaves while a slow one is still connecting.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from aimass_hpc.common import fsutil
from aimass_hpc.runtime import preempt, rng
from aimass_hpc.runtime.checkpoint import (
    CheckpointStore,
    RepositoryStore,
    SaveInfo,
    TrainState,
)
from aimass_hpc.runtime.config import CONFIG_FILE, RunConfig, load_config
from aimass_hpc.runtime.distributed import Backend, connect
from aimass_hpc.runtime.env import WorldInfo
from aimass_hpc.runtime.metrics import MetricsWriter
from aimass_hpc.runtime.result import RESULT_FILE
from aimass_hpc.runtime.sampler import ShardedBatches

PREEMPT_FILE = "preemptions.jsonl"

# Exit status of a rank whose stop could not be turned into a requeue (restart limit reached,
# scontrol refused, no Slurm): Slurm then ends the job FAILED, not COMPLETED.
EXIT_NOT_REQUEUED = 3

# The Job of this process, left collectively at exit (see finalize()).
_current: Job | None = None


class Job:
    """A rank's handle on the running job: world, collectives, checkpoints, metrics."""

    def __init__(self, config: RunConfig, backend: Backend, store: CheckpointStore | None) -> None:
        self.config = config
        self.backend = backend
        self.store = store
        self.world: WorldInfo = backend.world
        self.run_dir = Path(config.run_dir) if config.run_dir else None
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main)
        self._stop_code = preempt.STOP_NONE
        self._closed = False
        self._hyperparameters: dict[str, Any] = {}
        self._last_step: int | None = None

    # World -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def local_rank(self) -> int:
        return self.world.local_rank

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def barrier(self) -> None:
        """Collective: return once every rank has called it."""
        if self.world_size > 1 and not self._closed:
            self.backend.barrier()

    def close(self) -> None:
        """Collective: flush metrics, wait for every rank, then leave the process group.

        Idempotent; called for you when the script ends (``python -m aimass_hpc.runtime run``
        or an ``atexit`` hook), by :meth:`exit_for_requeue`, and by the built-in trainer.
        """
        if self._closed:
            return
        self.metrics.flush()
        self.barrier()
        self._closed = True
        self.backend.shutdown()

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``model`` on this rank's device and gradient averaging set up for the backend.

        Returns the module to call for training (DDP-wrapped on the torch backend) and the
        optimizer to step (Horovod-wrapped on the horovod backend). Build the optimizer over
        ``model.parameters()`` before calling this. With DDP the first training forward runs
        one throw-away forward/backward first so that the gradient buckets are the same in an
        uninterrupted and a resumed run (no weights, buffers or RNG states change).
        """
        model.to(self.device)
        optimizer = self.backend.wrap_optimizer(optimizer, model)
        wrapped = self.backend.wrap_model(model)
        if wrapped is not model:
            settle_buckets_on_first_forward(wrapped, model)
        return wrapped, optimizer

    def sampler(
        self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True
    ) -> ShardedBatches:
        """Deterministic global batches of ``batch_size`` split over the ranks.

        ``position(step)`` -> ``(epoch, batch)``, ``order(epoch)`` the epoch's permutation,
        ``local_indices(order, batch)`` this rank's share: a pure function of the step, so a
        resumed run sees exactly the samples an uninterrupted one does.
        """
        return ShardedBatches(
            num_samples=num_samples,
            batch_size=batch_size,
            world_size=self.world_size,
            rank=self.rank,
            seed=seed,
            shuffle=shuffle,
        )

    # Preemption ---------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank got a stop signal."""
        vote = preempt.local_stop_code(self.config.warning_signal)
        if self.world_size > 1:
            vote = self.backend.allreduce_max(vote)
        self._stop_code = max(self._stop_code, vote)
        return vote != preempt.STOP_NONE

    def exit_for_requeue(
        self, code: int = 0, *, step: int | None = None, total_steps: int | None = None
    ) -> NoReturn:
        """Collective: requeue the job (rank 0), record how the attempt ended, exit every rank.

        On the warning signal rank 0 asks Slurm to requeue the job. If it may not (the site's
        ``max_restarts`` used up) or cannot, ``result.json`` says ``"failed"`` with the reason
        (``restart limit reached, 3 of 3, last step 120 of 300``) and every rank exits
        with status 3, so Slurm ends the job FAILED. On SIGTERM (``scontrol requeue``,
        preemption, ``scancel``) Slurm decides what follows; ranks exit with ``code``.
        ``step``/``total_steps`` go into the reason (default: the last checkpoint's step).
        """
        stop_code = self._stop_code or preempt.STOP_WARN
        outcome = handle_stop(self, stop_code)
        verdict: tuple[str, str, int] | None = None
        if self.is_main:
            assert outcome is not None
            if step is None:
                step = self._last_checkpoint_step()
            verdict = stop_verdict(stop_code, outcome, step, total_steps, code)
            status, reason, _ = verdict
            write_result(
                self.run_dir,
                status,
                self.world,
                {},
                None,
                reason=reason,
                step=step,
                total_steps=total_steps,
                checkpoint_ref=self.store.latest_ref() if self.store is not None else None,
            )
        if self.world_size > 1:
            verdict = self.backend.broadcast_object(verdict)
        assert verdict is not None
        self.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(verdict[2])

    # Checkpoints ---------------------------------------------------------------------
    def save_checkpoint(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        extra: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        final: bool = False,
    ) -> str | None:
        """Collective: save a checkpoint (rank 0 writes) and return its ref on rank 0."""
        rng_states = self.backend.allgather_object(rng.capture())
        self._last_step = step
        if self.backend.sharded:
            return self._save_sharded(
                step, model, optimizer, extra, metrics, final, rng_states=rng_states
            )
        if not self.is_main or self.store is None:
            return None
        module = _unwrap(model)
        state = TrainState(
            model={k: v.detach().cpu() for k, v in module.state_dict().items()},
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            extra={
                **(extra or {}),
                "step": step,
                "rng": rng_states,
                "world_size": self.world_size,
            },
        )
        info = SaveInfo(
            kind="final" if final else "checkpoint",
            metrics=dict(metrics or {}),
            hyperparameters=dict(self._hyperparameters),
            run=lineage(self.config, self.world, step),
            tags=list(self.config.tags),
        )
        ref = self.store.save(state, info)
        self.metrics.log("event", event="checkpoint", step=step, ref=ref)
        return ref

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, Any] | None:
        """Collective: load the newest checkpoint of this run into ``model``/``optimizer``.

        Restores this rank's RNG states too. Returns the checkpoint's ``extra`` (with
        ``step``), or None when the run starts fresh. Call it after :meth:`wrap` with the
        optimizer ``wrap`` returned: Horovod's is a new object, which would not see state
        loaded into the one built before.
        """
        if self.store is None:
            return None
        if self.backend.sharded:
            return self._restore_sharded(model, optimizer)
        state = self.store.latest() if self.is_main else None
        if self.world_size > 1:
            state = self.backend.broadcast_object(state)
        if state is None:
            return None
        module = _unwrap(model)
        module.load_state_dict(state.model)
        if optimizer is not None and state.optimizer:
            optimizer.load_state_dict(state.optimizer)
        states = state.extra.get("rng") or []
        if len(states) == self.world_size:
            rng.restore(states[self.rank])
        self._last_step = state.step
        self.metrics.log("event", event="resume", step=state.step, ref=state.ref)
        return dict(state.extra)

    def _save_sharded(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any] | None,
        metrics: dict[str, float] | None,
        final: bool,
        *,
        rng_states: list[Any] | None = None,
        info: SaveInfo | None = None,
    ) -> str | None:
        """FSDP: every rank writes its pieces in parallel, rank 0 commits; ref on rank 0."""
        from aimass_hpc.runtime import sharded

        if self.store is None:
            return None
        sd, opt, layout = sharded.local_state(_unwrap(model), optimizer)
        state = TrainState(
            model=sd,
            optimizer=opt,
            extra={
                **(extra or {}),
                "step": step,
                "rng": rng_states,
                "world_size": self.world_size,
            }
            if rng_states is not None
            else {},
            layout=layout,
        )
        if info is None:
            info = SaveInfo(
                kind="final" if final else "checkpoint",
                metrics=dict(metrics or {}),
                hyperparameters=dict(self._hyperparameters),
                run=lineage(self.config, self.world, step),
                tags=list(self.config.tags),
            )
        ref = self.store.save_sharded(state, info, self.backend)
        if self.is_main:
            self.metrics.log("event", event="checkpoint", step=step, ref=ref)
        return ref if self.is_main else None

    def _restore_sharded(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any] | None:
        """FSDP: every rank reads the slices its own shards cover (any saved world size)."""
        from aimass_hpc.runtime import sharded

        assert self.store is not None
        ref = self.store.latest_ref() if self.is_main else None
        ref = self.backend.broadcast_object(ref)
        if ref is None:
            return None
        module = _unwrap(model)
        targets = sharded.Targets(module, optimizer)
        state = self.store.load_resharded(ref, targets.select)
        for name, entry in (state.layout or {}).items():  # in-memory store: same world
            targets.select(name, tuple(entry["global_shape"]))
        sd, opt = targets.restore(state.model, state.optimizer)
        module.load_state_dict(sd)
        if optimizer is not None and opt:
            optimizer.load_state_dict(opt)
        states = state.extra.get("rng") or []
        if len(states) == self.world_size:
            rng.restore(states[self.rank])
        self._last_step = state.step
        self.metrics.log("event", event="resume", step=state.step, ref=state.ref)
        return dict(state.extra)

    def _last_checkpoint_step(self) -> int | None:
        """The step of this run's newest checkpoint (rank 0), else of the last save/restore."""
        if self.store is not None:
            for entry in reversed(self.store.history()):
                if entry.get("kind") == "checkpoint" and entry.get("step") is not None:
                    return int(entry["step"])
        return self._last_step

    # Hyperparameters and the final model --------------------------------------------
    def log_params(self, **hyperparameters: Any) -> None:
        """Record the run's hyperparameters: stored with every version this job saves
        (``aimass models show``) and logged as a ``params`` event in metrics.jsonl."""
        self._hyperparameters.update(hyperparameters)
        self.metrics.log("event", event="params", params=_jsonable(hyperparameters))

    def finish(
        self,
        model: nn.Module,
        *,
        metrics: dict[str, float] | None = None,
        recipe: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        model_type: str | None = None,
    ) -> str | None:
        """Collective: save the final model (weights, metrics, lineage) as a new version.

        ``recipe`` says how a server rebuilds the module: ``{"factory": "pkg.mod:function",
        "kwargs": {...}, "input_shape": [4], "input_dtype": "float32"}``; without it the
        version cannot be served. ``pythonpath`` defaults to the script's directory and the
        spec's ``pythonpath``. ``hyperparameters`` add to those of :meth:`log_params`.
        FLOPs per sample and peak memory are measured from ``input_shape`` when given.
        Its parent is the run's last checkpoint; rank 0 writes and returns the ref.
        """
        full_recipe = self._full_recipe(recipe) if recipe is not None else None
        hparams = {**self._hyperparameters, **dict(hyperparameters or {})}
        info = SaveInfo(
            kind="final",
            metrics=dict(metrics or {}),
            hyperparameters=hparams,
            recipe=full_recipe,
            run=lineage(self.config, self.world, -1),
            tags=list(self.config.tags),
            model_type=model_type,
        )
        ref = None
        if self.backend.sharded:
            # Sharded final model (one piece per rank). Its cost is the whole model's: every
            # rank runs the measuring forward together (FSDP gathers each layer).
            if self.store is not None:
                info.flops_per_sample, info.peak_memory_bytes = _measure(
                    _unwrap(model), full_recipe, self.device
                )
            ref = self._save_sharded(-1, model, None, None, None, True, info=info)
        elif self.is_main and self.store is not None:
            module = _unwrap(model)
            weights = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            info.flops_per_sample, info.peak_memory_bytes = _measure(
                module, full_recipe, self.device
            )
            ref = self.store.save(TrainState(model=weights), info)
        if self.is_main:
            write_result(self.run_dir, "completed", self.world, metrics or {}, ref)
            self.metrics.log("event", event="done", ref=ref)
        self.metrics.flush()
        self.barrier()
        return ref

    def _full_recipe(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        """``recipe`` checked, with ``pythonpath`` defaulting to where the script's code is."""
        factory = recipe.get("factory")
        if not isinstance(factory, str) or ":" not in factory:
            raise ValueError(
                f"finish(recipe=...): factory must look like 'package.module:function', "
                f"got {factory!r}"
            )
        out = dict(recipe)
        if "pythonpath" not in out:
            paths = []
            if self.config.script:
                paths.append(str(Path(self.config.script).resolve().parent))
            elif sys.argv and sys.argv[0].endswith(".py"):
                paths.append(str(Path(sys.argv[0]).resolve().parent))
            paths.extend(p for p in self.config.pythonpath if p not in paths)
            out["pythonpath"] = paths
        return out

    # Metrics ---------------------------------------------------------------------------
    def log_metrics(self, step: int, kind: str = "step", **values: Any) -> None:
        """Record metrics of ``step`` (rank 0 only writes; others ignore the call)."""
        self.metrics.log(kind, step=step, **values)


def settle_buckets_on_first_forward(wrapped: nn.Module, module: nn.Module) -> None:
    """Make DDP's gradient buckets the same in an uninterrupted and a resumed run.

    DDP regroups gradients after its first backward (in the order they became ready), and
    where an element sits in a bucket decides the order in which the ranks' values are summed.
    A resumed run's first step is a later step, so without this it would round differently.
    Before the first grad-enabled training forward, one throw-away forward/backward (the sum of
    the outputs) lets DDP rebuild its buckets; gradients are dropped and buffers (BatchNorm
    statistics) and RNG states are put back, so no number the script computes changes.
    """
    handle: Any = None

    def hook(ddp: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (torch.is_grad_enabled() and ddp.training):
            return
        handle.remove()  # once, and not for the throw-away call below
        saved_rng = rng.capture()
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        grads = [p.grad for p in module.parameters()]
        outputs = [t for t in _tensors(ddp(*args, **kwargs)) if t.requires_grad]
        if outputs:
            torch.stack([t.float().sum() for t in outputs]).sum().backward()
        with torch.no_grad():
            for p, g in zip(module.parameters(), grads, strict=True):
                p.grad = g
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        rng.restore(saved_rng)

    handle = wrapped.register_forward_pre_hook(hook, with_kwargs=True)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with anything JSON cannot hold turned into its string."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            json.dumps(value)
            out[str(key)] = value
        except (TypeError, ValueError):
            out[str(key)] = str(value)
    return out


def _measure(
    module: nn.Module, recipe: Mapping[str, Any] | None, device: torch.device
) -> tuple[float | None, int | None]:
    """FLOPs per sample and peak memory of the final model (None where not measurable)."""
    from aimass_hpc.runtime import model_stats

    try:
        stats = model_stats.measure(module, model_stats.sample_input(recipe), device)
    except Exception as exc:  # a cost estimate must never lose the trained model
        print(f"aimass: could not measure the model's cost: {exc}", file=sys.stderr)
        return None, None
    return stats.flops_per_sample, stats.peak_memory_bytes


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel-style wrapper (its ``.module``), else itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def lineage(config: RunConfig, world: WorldInfo, step: int) -> dict[str, Any]:
    """Where a version came from: the job, the run directory, the spec."""
    return {
        "job_id": world.job_id,
        "restart": world.restart_count,
        "run_dir": config.run_dir,
        "spec_path": config.spec_path,
        "spec": config.spec,
        "backend": config.backend,
        "world_size": world.world_size,
        "step": step,
    }


def make_store(config: RunConfig) -> CheckpointStore | None:
    """The repository store for this run (None without repository and model name)."""
    if config.repository and config.model_name:
        return RepositoryStore(
            config.repository,
            config.model_name,
            config.run_dir,
            keep=config.keep_checkpoints,
            resume_from=config.resume_from,
        )
    return None


def fsdp_options(config: RunConfig) -> Any:
    """The FSDP backend's options from the run config's ``[train]`` fields."""
    from aimass_hpc.runtime.fsdp import FSDPOptions

    t = config.train
    return FSDPOptions(
        wrap=list(t.fsdp_wrap),
        mixed_precision=t.mixed_precision,
        activation_checkpointing=t.activation_checkpointing,
        cpu_offload=t.cpu_offload,
    )


def write_result(
    run_dir: Path | None,
    status: str,
    whom: WorldInfo,
    metrics: dict[str, Any],
    final_ref: str | None,
    **more: Any,
) -> None:
    """``<run_dir>/result.json``: how the latest attempt of the job ended (rank 0).

    ``status`` is one of completed, requeued, stopped, failed; every status but completed
    comes with a one-line ``reason``.
    """
    if run_dir is None:
        return
    fsutil.atomic_write_json(
        run_dir / RESULT_FILE,
        {
            "status": status,
            "job_id": whom.job_id,
            "restart": whom.restart_count,
            "metrics": metrics,
            "final_ref": final_ref,
            **more,
        },
    )


def stop_verdict(
    stop_code: int,
    outcome: preempt.RequeueOutcome,
    step: int | None,
    total_steps: int | None,
    code: int = 0,
) -> tuple[str, str, int]:
    """``(status, reason, exit status)`` of an attempt that stopped at a step boundary.

    Requeued: ``requeued``. SIGTERM alone: ``stopped`` (Slurm decides what follows). A warning
    that could not be acted on: ``failed`` and exit 3, or ``stopped`` and exit 3 outside Slurm
    (nothing to requeue).
    """
    where = ""
    if step is not None:
        where = f", last step {step}" + (f" of {total_steps}" if total_steps is not None else "")
    reason = f"{outcome.reason}{where}"
    if outcome.requeued:
        return "requeued", reason, code
    if stop_code != preempt.STOP_WARN:
        return "stopped", reason, code
    if outcome.reason.startswith(preempt.NOT_IN_SLURM):
        return "stopped", reason, EXIT_NOT_REQUEUED
    return "failed", reason, EXIT_NOT_REQUEUED


def handle_stop(job: Job, stop_code: int) -> preempt.RequeueOutcome | None:
    """After the stop checkpoint: rank 0 requeues on the warning signal and records why.

    On SIGTERM alone the sender decides (``scontrol requeue`` and preemption with requeue put
    the job back in the queue, ``scancel`` ends it), unless Slurm reports the job PREEMPTED
    without requeueing it (PreemptMode=CANCEL): then we requeue ourselves. The record in
    ``preemptions.jsonl`` then says ``"requeued": null`` (pending); if the job does come back,
    its next start appends a ``restart`` record confirming it (:func:`confirm_restart`).
    """
    if not job.is_main:
        return None
    target = preempt.RequeueTarget.from_env()
    pending = False
    if stop_code == preempt.STOP_WARN or (
        stop_code == preempt.STOP_TERM and preempt.job_state(target.job_id) == "PREEMPTED"
    ):
        outcome = preempt.requeue(target, job.config.max_restarts)
    else:
        pending = True
        outcome = preempt.RequeueOutcome(False, "stopped by SIGTERM; Slurm decides what follows")
    record = {
        "kind": "stop",
        "job_id": target.job_id,
        "restart": target.restart_count,
        "signals": preempt.received(),
        "requeued": None if pending else outcome.requeued,
        "reason": outcome.reason,
    }
    if job.run_dir is not None:
        fsutil.append_line(job.run_dir / PREEMPT_FILE, json.dumps(record))
    job.metrics.log("event", event="preempt", **{k: v for k, v in record.items() if k != "kind"})
    job.metrics.flush()
    print(f"aimass: stopped at a step boundary: {outcome.reason}", file=sys.stderr, flush=True)
    return outcome


def confirm_restart(run_dir: Path | None, world: WorldInfo) -> dict[str, Any] | None:
    """Rank 0 at start-up: confirm that a pending stop (``"requeued": null``) was a requeue.

    A job that starts again with a higher ``SLURM_RESTART_COUNT`` than the pending record's
    was put back in the queue; the appended record says so (``kind: restart``).
    """
    if run_dir is None or world.restart_count == 0 or not world.is_main:
        return None
    records = fsutil.read_json_lines(run_dir / PREEMPT_FILE)
    if not records:
        return None
    last = records[-1]
    if last.get("kind", "stop") != "stop" or last.get("requeued") is not None:
        return None
    if int(last.get("restart", 0)) >= world.restart_count:
        return None
    record = {
        "kind": "restart",
        "job_id": world.job_id,
        "restart": world.restart_count,
        "requeued": True,
        "confirms_restart": int(last.get("restart", 0)),
        "reason": f"job started again (restart {world.restart_count}): the stop was a requeue",
    }
    fsutil.append_line(run_dir / PREEMPT_FILE, json.dumps(record))
    return record


def finalize() -> None:
    """Leave the job's process group together (barrier, then teardown); idempotent.

    Called by ``python -m aimass_hpc.runtime run`` when the script returns (that entry point
    ends with ``os._exit``), and at exit of a script started some other way.
    """
    job = _current
    if job is not None:
        job.close()


def _finalize_at_exit() -> None:
    # After an uncaught exception the other ranks will never reach the barrier: leave at once
    # (the launcher stops them) instead of waiting for them until the timeout.
    if getattr(sys, "last_value", None) is not None:
        return
    finalize()


def init(config: RunConfig | str | Path | None = None) -> Job:
    """Join the job's distributed world and return a :class:`Job`.

    ``config`` defaults to ``$AIMASS_RUN_DIR/train.json`` when that exists (inside an
    ``aimass train`` job), else a bare config (torch backend, no repository). Collective:
    returns once every rank is connected.
    """
    global _current
    if config is None:
        run_dir = os.environ.get("AIMASS_RUN_DIR")
        path = Path(run_dir) / CONFIG_FILE if run_dir else None
        config = load_config(path) if path and path.exists() else RunConfig(run_dir=run_dir)
    elif not isinstance(config, RunConfig):
        config = load_config(config)
    if config.run_dir is None:
        config.run_dir = os.environ.get("AIMASS_RUN_DIR") or None
    preempt.install(("TERM", config.warning_signal))
    world = WorldInfo.from_env()
    backend = connect(
        config.backend,
        world,
        device=config.train.device,
        timeout_s=config.timeout_s,
        fsdp=fsdp_options(config),
    )
    preempt.reinstall()  # MPI/NCCL initialisation must not have taken our handlers
    job = Job(config, backend, make_store(config))
    confirm_restart(job.run_dir, world)
    # Nobody leaves start-up before everyone has arrived: a rank that finished early and
    # exited would take the rendezvous (rank 0's store) away from one still connecting.
    job.barrier()
    if _current is None:
        atexit.register(_finalize_at_exit)
    _current = job
    return job
