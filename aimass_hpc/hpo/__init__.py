"""Hyperparameter search algorithms: spaces and ask/tell samplers (no scheduler inside).

``Space`` describes what to search; a sampler (``MCTSSampler``, ``RandomSampler`` or
``OptunaTPESampler``) proposes ``Trial``s with ``ask`` and learns results with ``tell``. The
driver that runs trials as batch jobs is ``aimass_hpc.launch.search_driver``; it rebuilds a
sampler from its journal (see ``Sampler``). ``OptunaTPESampler`` imports optuna only when
constructed.

Runs wherever the search driver runs (login node or the driver's job) and in benchmarks; pure
algorithms: imports ``common`` (name rules) and ``runtime`` (metrics), never ``launch``,
``cli`` or a scheduler.
"""

from __future__ import annotations

from typing import Any

from aimass_hpc.hpo.mcts import MCTSSampler
from aimass_hpc.hpo.samplers import Direction, RandomSampler, Sampler, Trial, TrialRecord
from aimass_hpc.hpo.space import Categorical, Float, Int, Param, Space

__all__ = [
    "SAMPLERS",
    "Categorical",
    "Float",
    "Int",
    "MCTSSampler",
    "OptunaTPESampler",
    "Param",
    "RandomSampler",
    "Sampler",
    "Space",
    "Trial",
    "TrialRecord",
    "make_sampler",
]

#: Sampler names a spec can use (``sampler = "mcts"``).
SAMPLERS = ("mcts", "random", "tpe")


def __getattr__(name: str) -> Any:
    # Lazy: importing aimass_hpc.hpo must not import optuna.
    if name == "OptunaTPESampler":
        from aimass_hpc.hpo.optuna_adapter import OptunaTPESampler

        return OptunaTPESampler
    raise AttributeError(name)


def make_sampler(
    name: str,
    space: Space,
    *,
    seed: int | None = None,
    direction: Direction = "minimize",
    **options: Any,
) -> Sampler:
    """A sampler by spec name (``mcts``, ``random``, ``tpe``); options go to its constructor.

    Raises ``InputError`` for an unknown name or option, so a spec typo is one clear line.
    """
    from aimass_hpc.common.errors import InputError

    if name == "mcts":
        cls: type[Sampler] = MCTSSampler
    elif name == "random":
        cls = RandomSampler
    elif name == "tpe":
        cls = __getattr__("OptunaTPESampler")
    else:
        raise InputError(f"sampler: expected one of {', '.join(SAMPLERS)} (got {name!r})")
    try:
        return cls(space, seed=seed, direction=direction, **options)
    except (TypeError, ValueError) as exc:
        raise InputError(f"sampler: bad option for {name!r}: {exc}") from None
