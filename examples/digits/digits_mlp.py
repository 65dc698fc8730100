"""A real workload: a small MLP on scikit-learn's handwritten digits (ships with sklearn).

``build`` is the task function named in ``spec.toml`` (``task.ref = "digits_mlp:build"``);
``make_model`` is what a server calls to rebuild the bare network (the serving recipe).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aimass_hpc.runtime import TrainTask


def make_model(hidden: int = 64, dropout: float = 0.1) -> nn.Module:
    """64 pixel inputs -> ``hidden`` ReLU units (with dropout) -> 10 digit logits."""
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of correctly classified samples."""
    return (logits.argmax(dim=1) == target).float().mean()


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digit images (as 64 floats) and labels shipped with scikit-learn.

    Reads sklearn's bundled CSV directly: importing scikit-learn costs about a second of CPU
    per rank, which adds up when many ranks start on few cores.
    """
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # layout changed: take the public way

    x, y = load_digits(return_X_y=True)
    return x, y


def load_split(val_fraction: float = 0.2, split_seed: int = 0):
    """Digits as float tensors in [0, 1], split train/val with a fixed, separate seed."""
    x, y = load_digits_arrays()
    x = torch.from_numpy((x / 16.0).astype(np.float32))
    y = torch.from_numpy(y.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(x)))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


class SlowLoss(nn.Module):
    """Cross-entropy that sleeps ``delay`` seconds per training call: stretches a run so a
    demo (or a test) can preempt it mid-way. Evaluation (no grad) is not slowed."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.inner = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            time.sleep(self.delay)
        return self.inner(logits, target)


def build(
    hidden: int = 64, dropout: float = 0.1, val_fraction: float = 0.2, step_delay: float = 0.0
) -> TrainTask:
    """The task: model, train/val splits, cross-entropy loss, accuracy.

    ``step_delay`` (seconds per step) only slows training down, for preemption demos.
    """
    train, val = load_split(val_fraction)
    return TrainTask(
        model=make_model(hidden, dropout),
        train=train,
        val=val,
        loss=SlowLoss(step_delay) if step_delay > 0 else nn.CrossEntropyLoss(),
        metrics={"accuracy": accuracy},
        recipe={
            "kind": "factory",
            "factory": "digits_mlp:make_model",
            "kwargs": {"hidden": hidden, "dropout": dropout},
            "input_shape": [64],
            "input_dtype": "float32",
        },
    )
