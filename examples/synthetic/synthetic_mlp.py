"""A synthetic, larger workload for throughput: a deep MLP regressing a fixed random teacher.

The data is generated from a seed (no files), so every rank and every restart sees the same
samples. Sizes are arguments: the defaults (about 8M parameters) suit one GPU; the benchmark
and tests pass smaller ones for the 2-core CI machine.
"""

from __future__ import annotations

import torch
from torch import nn

from aimass_hpc.runtime import TrainTask


def make_model(features: int = 512, width: int = 1024, depth: int = 8) -> nn.Module:
    """``depth`` Linear+GELU blocks of ``width`` units, regressing ``features // 8`` outputs."""
    layers: list[nn.Module] = [nn.Linear(features, width), nn.GELU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, max(1, features // 8)))
    return nn.Sequential(*layers)


def make_data(samples: int, features: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs from N(0, 1) and targets from a random linear teacher plus a tanh."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=gen)
    teacher = torch.randn(features, max(1, features // 8), generator=gen) / features**0.5
    return x, torch.tanh(x @ teacher)


def build(
    samples: int = 65536, features: int = 512, width: int = 1024, depth: int = 8
) -> TrainTask:
    """The task: a synthetic regression with an MSE loss."""
    x, y = make_data(samples, features)
    n_val = max(1, samples // 16)
    return TrainTask(
        model=make_model(features, width, depth),
        train=(x[n_val:], y[n_val:]),
        val=(x[:n_val], y[:n_val]),
        loss=nn.MSELoss(),
        recipe={
            "kind": "factory",
            "factory": "synthetic_mlp:make_model",
            "kwargs": {"features": features, "width": width, "depth": depth},
            "input_shape": [features],
            "input_dtype": "float32",
        },
    )
