"""What a task function returns, and how the job finds and calls it.

A task is a ``module:function`` reference. The function takes the spec's ``[task.args]`` as
keyword arguments and returns a :class:`TrainTask` (or a dict with the same keys)::

    def build(hidden: int = 64) -> TrainTask:
        return TrainTask(model=..., train=..., val=..., loss=nn.CrossEntropyLoss(),
                         metrics={"accuracy": accuracy})

Datasets are map-style torch datasets yielding ``(input, target)`` pairs, or ``(X, y)`` tensor
tuples (turned into a ``TensorDataset``, which the trainer indexes a whole batch at a time).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

MetricFn = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass
class TrainTask:
    """Everything the built-in trainer needs from user code."""

    model: nn.Module
    train: Dataset[Any]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    val: Dataset[Any] | None = None
    metrics: dict[str, MetricFn] = field(default_factory=dict)
    # How a server rebuilds the bare model: {"factory": "module:function", "kwargs": {...}}.
    recipe: dict[str, Any] | None = None
    # What the model is for (aimass_hpc.repo.metadata.MODEL_TYPES: classifier, regressor,
    # language-model, ...); None: read from the recipe's "model_type", else from the loss.
    model_type: str | None = None

    @classmethod
    def coerce(cls, value: Any, ref: str) -> TrainTask:
        """Accept a TrainTask or a dict/tuple-of-tensors form; name ``ref`` on errors."""
        if isinstance(value, TrainTask):
            task = value
        elif isinstance(value, Mapping):
            known = {"model", "train", "val", "loss", "metrics", "recipe", "model_type"}
            unknown = set(value) - known
            if unknown:
                raise TypeError(f"task {ref} returned unknown keys {sorted(unknown)}")
            missing = {"model", "train", "loss"} - set(value)
            if missing:
                raise TypeError(f"task {ref} returned no {', '.join(sorted(missing))}")
            task = cls(**dict(value))
        else:
            raise TypeError(f"task {ref} must return a TrainTask or a dict, not {type(value)}")
        task.train = as_dataset(task.train, f"{ref} train")
        if task.val is not None:
            task.val = as_dataset(task.val, f"{ref} val")
        if not isinstance(task.model, nn.Module):
            raise TypeError(f"task {ref}: model must be a torch.nn.Module")
        task.metrics = dict(task.metrics or {})
        if task.model_type is not None:
            from aimass_hpc.common.errors import InputError
            from aimass_hpc.repo.metadata import check_model_type

            try:
                check_model_type(task.model_type)
            except InputError as exc:
                raise TypeError(f"task {ref}: {exc}") from None
        return task


def as_dataset(value: Any, what: str) -> Dataset[Any]:
    """A dataset from a Dataset or an ``(inputs, targets)`` tuple of tensors."""
    if isinstance(value, Dataset):
        return value
    if isinstance(value, Sequence) and all(isinstance(t, torch.Tensor) for t in value):
        return TensorDataset(*value)
    raise TypeError(f"{what}: expected a torch Dataset or a tuple of tensors")


def resolve_ref(ref: str, pythonpath: Sequence[str] = ()) -> Callable[..., Any]:
    """Import ``module:function`` (adding ``pythonpath`` entries to ``sys.path`` first)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task reference {ref!r} must look like 'package.module:function'")
    for entry in reversed(list(pythonpath)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj


def load_task(ref: str, args: Mapping[str, Any], pythonpath: Sequence[str] = ()) -> TrainTask:
    """Call the task function with ``args`` and check what it returned."""
    fn = resolve_ref(ref, pythonpath)
    return TrainTask.coerce(fn(**dict(args)), ref)


def model_from_task(
    task: str, args: Mapping[str, Any] | None = None, pythonpath: Sequence[str] = ()
) -> nn.Module:
    """A serving factory: call task function ``task`` and return only its model.

    The default serving recipe of a task without its own (``{"factory":
    "aimass_hpc.runtime.task:model_from_task", "kwargs": {"task": ..., "args": ...}}``).
    """
    return load_task(task, args or {}, pythonpath).model
