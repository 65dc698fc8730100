"""In-job runtime: distributed world, built-in trainer, checkpoints, preemption, metrics.

Public API (imported lazily, so ``import aimass_hpc.runtime`` costs nothing and
``python -m aimass_hpc.runtime`` can install its signal handler before torch loads):

- :func:`init` -> :class:`Job` for user scripts (docs/script-mode.md): rank/world, ``wrap``,
  ``restore``, ``sampler``, ``save_checkpoint``, ``should_stop``, ``exit_for_requeue``,
  ``log_metrics``, ``log_params``, ``barrier``, ``finish`` (with a serving recipe).
- :class:`TrainTask` what a task function returns; :class:`Trainer` the built-in trainer;
  :class:`TrainParams` / :class:`RunConfig` its configuration.
- :class:`WorldInfo` rank and world from SLURM_* / Open MPI / torchrun variables.
- :func:`report_result` a program's final value for a search (torch-free).
- :func:`read_metrics` a run's metrics, with records superseded by a restart removed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "init": "aimass_hpc.runtime.api",
    "Job": "aimass_hpc.runtime.api",
    "TrainTask": "aimass_hpc.runtime.task",
    "Trainer": "aimass_hpc.runtime.trainer",
    "FitResult": "aimass_hpc.runtime.trainer",
    "TrainParams": "aimass_hpc.runtime.config",
    "RunConfig": "aimass_hpc.runtime.config",
    "WorldInfo": "aimass_hpc.runtime.env",
    "read_metrics": "aimass_hpc.runtime.metrics",
    "MetricsWriter": "aimass_hpc.runtime.metrics",
    "connect": "aimass_hpc.runtime.distributed",
    "report_result": "aimass_hpc.runtime.result",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aimass_hpc.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
