"""Seeding and capturing the random state of every library a training step can touch.

Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's
generator. States are plain picklable values so they travel through collectives and into the
checkpoint's ``extra`` unchanged.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed: ranks draw different dropout masks, reproducibly."""
    return seed + 7919 * rank


def capture() -> dict[str, Any]:
    """The current state of every generator (picklable, exact)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state().numpy().copy(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().copy() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back a state from :func:`capture` (also after a round trip through the repository)."""
    py = state["python"]
    # JSON/HDF5 round trips may turn the tuple's inner tuple into a list.
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            str(np_state[0]),
            np.asarray(np_state[1], dtype=np.uint32),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        )
    )
    torch.set_rng_state(torch.as_tensor(np.asarray(state["torch"], dtype=np.uint8)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.as_tensor(np.asarray(s, dtype=np.uint8)) for s in state["cuda"]]
        )
