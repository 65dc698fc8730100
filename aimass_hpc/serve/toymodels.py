"""Small model factories for demos, tests and benchmarks (recipe ``factory`` targets).

A recipe names a factory as ``aimass_hpc.serve.toymodels:mlp``; these exist so that a
service can be tried, tested and benchmarked without any user code on the path.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def mlp(
    in_features: int = 16, hidden: int = 64, out_features: int = 4, depth: int = 2
) -> nn.Module:
    """A plain ReLU MLP: ``depth`` hidden layers of width ``hidden``."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def cnn(channels: int = 3, size: int = 32, classes: int = 10, width: int = 32) -> nn.Module:
    """A small image classifier: two conv+pool stages and a linear head."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (size // 4) ** 2, classes),
    )


class _Slow(nn.Module):
    """Wraps a module and sleeps per forward: makes batching observable in tests."""

    def __init__(self, inner: nn.Module, delay_ms: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay_s = delay_ms / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)  # releases the GIL, like a real forward does
        return self.inner(x)


def slow_mlp(
    in_features: int = 16, hidden: int = 64, out_features: int = 4, delay_ms: float = 20.0
) -> nn.Module:
    """An :func:`mlp` whose every forward takes at least ``delay_ms``."""
    return _Slow(mlp(in_features, hidden, out_features), delay_ms)


def recipe(
    factory: str = "aimass_hpc.serve.toymodels:mlp",
    input_shape: list[int] | None = None,
    **kwargs: Any,
) -> dict:
    """A recipe dict for one of these factories.

    ``input_shape`` defaults to ``[in_features]`` (MLPs) or ``[channels, size, size]`` (CNN).
    """
    if input_shape is None:
        if factory.endswith(":cnn"):
            size = int(kwargs.get("size", 32))
            input_shape = [int(kwargs.get("channels", 3)), size, size]
        else:
            input_shape = [int(kwargs.get("in_features", 16))]
    return {
        "factory": factory,
        "kwargs": kwargs,
        "input_shape": list(input_shape),
        "input_dtype": "float32",
    }
