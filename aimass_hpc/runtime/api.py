"""The runtime API for user scripts launched on every rank (``[script]`` specs).

    from aimass_hpc import runtime

    job = runtime.init()                      # distributed world from the job's environment
    model, optimizer = job.wrap(model, optimizer)
    start = job.restore(model, optimizer)     # extra dict of the newest checkpoint, or None
    for step in range(...):
        ...
        job.log_metrics(step, loss=loss)
        if job.should_stop():                 # collective: a preemption/time-limit warning
            job.save_checkpoint(step, model, optimizer, extra={...})
            job.exit_for_requeue()            # rank 0 requeues (site limit), all exit
        if step % 100 == 0:
            job.save_checkpoint(step, model, optimizer)
    job.finish(model, metrics={"accuracy": acc})

Checkpoints carry every rank's RNG states; ``restore`` puts this rank's back, so a script
that draws its randomness from the global generators resumes exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

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

PREEMPT_FILE = "preemptions.jsonl"


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

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``model`` on this rank's device and gradient averaging set up for the backend.

        Returns the module to call for training (DDP-wrapped on the torch backend) and the
        optimizer to step (Horovod-wrapped on the horovod backend). Build the optimizer over
        ``model.parameters()`` before calling this.
        """
        model.to(self.device)
        optimizer = self.backend.wrap_optimizer(optimizer, model)
        return self.backend.wrap_model(model), optimizer

    # Preemption ---------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank got a stop signal."""
        vote = preempt.local_stop_code(self.config.warning_signal)
        if self.world_size > 1:
            vote = self.backend.allreduce_max(vote)
        self._stop_code = max(self._stop_code, vote)
        return vote != preempt.STOP_NONE

    def exit_for_requeue(self, code: int = 0) -> None:
        """Requeue the job when the warning signal came (rank 0), then exit every rank."""
        handle_stop(self, self._stop_code or preempt.STOP_WARN)
        self.backend.barrier()
        sys.stdout.flush()
        os._exit(code)

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
        ``step``), or None when the run starts fresh.
        """
        if self.store is None:
            return None
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
        self.metrics.log("event", event="resume", step=state.step, ref=state.ref)
        return dict(state.extra)

    def finish(self, model: nn.Module, *, metrics: dict[str, float] | None = None) -> str | None:
        """Collective: save the final model (weights, metrics, lineage) as a new version.

        Its parent is the run's last checkpoint; rank 0 writes and returns the ref.
        """
        ref = None
        if self.is_main and self.store is not None:
            module = _unwrap(model)
            weights = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            info = SaveInfo(
                kind="final",
                metrics=dict(metrics or {}),
                run=lineage(self.config, self.world, -1),
                tags=list(self.config.tags),
            )
            ref = self.store.save(TrainState(model=weights), info)
        if self.is_main:
            write_result(self.run_dir, "completed", self.world, metrics or {}, ref)
            self.metrics.log("event", event="done", ref=ref)
        self.metrics.flush()
        if self.world_size > 1:
            self.backend.barrier()
        return ref

    # Metrics ---------------------------------------------------------------------------
    def log_metrics(self, step: int, kind: str = "step", **values: Any) -> None:
        """Record metrics of ``step`` (rank 0 only writes; others ignore the call)."""
        self.metrics.log(kind, step=step, **values)


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
        return RepositoryStore(config.repository, config.model_name, config.run_dir)
    return None


def write_result(
    run_dir: Path | None,
    status: str,
    whom: WorldInfo,
    metrics: dict[str, Any],
    final_ref: str | None,
    **more: Any,
) -> None:
    """``<run_dir>/result.json``: how the latest attempt of the job ended (rank 0)."""
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


def handle_stop(job: Job, stop_code: int) -> preempt.RequeueOutcome | None:
    """After the stop checkpoint: rank 0 requeues on the warning signal and records why.

    On SIGTERM alone the sender decides (``scontrol requeue`` and preemption with requeue put
    the job back in the queue, ``scancel`` ends it), unless Slurm reports the job PREEMPTED
    without requeueing it (PreemptMode=CANCEL): then we requeue ourselves.
    """
    if not job.is_main:
        return None
    target = preempt.RequeueTarget.from_env()
    if stop_code == preempt.STOP_WARN or (
        stop_code == preempt.STOP_TERM and preempt.job_state(target.job_id) == "PREEMPTED"
    ):
        outcome = preempt.requeue(target, job.config.max_restarts)
    else:
        outcome = preempt.RequeueOutcome(False, "stopped by SIGTERM; Slurm decides what follows")
    record = {
        "job_id": target.job_id,
        "restart": target.restart_count,
        "signals": preempt.received(),
        "requeued": outcome.requeued,
        "reason": outcome.reason,
    }
    if job.run_dir is not None:
        fsutil.append_line(job.run_dir / PREEMPT_FILE, json.dumps(record))
    job.metrics.log("event", event="preempt", **record)
    job.metrics.flush()
    print(f"aimass: stopped at a step boundary: {outcome.reason}", file=sys.stderr, flush=True)
    return outcome


def init(config: RunConfig | str | Path | None = None) -> Job:
    """Join the job's distributed world and return a :class:`Job`.

    ``config`` defaults to ``$AIMASS_RUN_DIR/train.json`` when that exists (inside an
    ``aimass train`` job), else a bare config (torch backend, no repository).
    """
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
    backend = connect(config.backend, world, device=config.train.device, timeout_s=config.timeout_s)
    preempt.reinstall()  # MPI/NCCL initialisation must not have taken our handlers
    return Job(config, backend, make_store(config))
