"""What the job is told to do: a plain JSON file in the run directory.

The login node validates the user's TOML spec (``aimass_hpc.config.train_spec``) and writes the
resolved result here as ``<run_dir>/train.json``; the job reads it with :func:`load_config`.
Plain dataclasses, so the in-job runtime does not depend on login-node code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "train.json"


@dataclass
class TrainParams:
    """Hyperparameters of the built-in trainer. ``batch_size`` is the global batch."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1
    steps: int | None = None
    seed: int = 0
    checkpoint_every: int = 0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    shuffle: bool = True
    num_workers: int = 0
    device: str = "auto"
    # FSDP backend only (aimass_hpc.runtime.fsdp): shard units by module class name (empty:
    # every module holding parameters), bf16 compute ("auto": on GPUs only), recompute
    # activations in backward, keep sharded parameters and optimizer state on the CPU.
    fsdp_wrap: list[str] = field(default_factory=list)
    mixed_precision: str = "auto"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    # Checkpoints written and committed in a background thread; the step loop only waits
    # for the snapshot to host memory (aimass_hpc.runtime.checkpoint.PendingSave).
    async_checkpoint: bool = False


@dataclass
class RunConfig:
    """Everything the in-job runtime needs, resolved on the login node."""

    run_dir: str | None = None
    backend: str = "torch"
    task: str | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    script: str | None = None
    script_args: list[str] = field(default_factory=list)
    train: TrainParams = field(default_factory=TrainParams)
    model_name: str | None = None
    repository: str | None = None
    tags: list[str] = field(default_factory=list)
    warning_signal: str = "USR1"
    max_restarts: int = 3
    pythonpath: list[str] = field(default_factory=list)
    timeout_s: float = 600.0
    # The user's spec as written (lineage of the final model) and where it came from.
    spec: dict[str, Any] = field(default_factory=dict)
    spec_path: str | None = None
    # Retention: keep this many of the run's newest checkpoints (final models and aliased
    # versions always stay); None keeps them all. Spec [train] keep_checkpoints, else the
    # site's training.keep_checkpoints.
    keep_checkpoints: int | None = None
    # Another run directory whose newest checkpoint this run starts from when it has none of
    # its own (resume with another world size: a new job, same model). `--resume-from`.
    resume_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown run config keys {sorted(unknown)}")
        train = data.pop("train", None) or {}
        return cls(train=TrainParams(**train), **data)


def load_config(path: str | Path) -> RunConfig:
    """Read a run config JSON file (``train.json``)."""
    with open(path, encoding="utf-8") as fh:
        return RunConfig.from_dict(json.load(fh))
