"""Asynchronous successive halving: stop trials whose intermediate metric is hopeless.

Rungs sit at steps ``min_step * eta**k``. When a trial first reaches rung ``k`` (it reported the
metric at a step >= the rung), its value there is compared with every other trial that reached
that rung, finished or not; unless it is among the best ``ceil(n / eta)`` it is pruned. A rung
judges nothing until ``max(eta, min_trials)`` trials have reached it, so the first trials of an
asynchronous search are never pruned for lack of company (the rule of ASHA, Li et al. 2020).

Pure logic, no I/O: the driver feeds ``{trial_id: [(step, value), ...]}`` read from the trials'
metrics and acts on the :class:`PruneDecision`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

History = list[tuple[int, float]]


@dataclass(frozen=True)
class PruneDecision:
    """Stop ``trial_id``: at rung ``rung`` (step ``step``) its value ``value`` ranked ``rank``."""

    trial_id: int
    rung: int
    step: int
    value: float
    rank: int
    peers: int

    @property
    def reason(self) -> str:
        """One line for the journal and the status table."""
        return f"pruned at step {self.step} (rung {self.rung}): ranked {self.rank} of {self.peers}"


class SuccessiveHalving:
    """The pruning rule; ``direction`` is the search's."""

    def __init__(
        self,
        *,
        min_step: int = 1,
        reduction_factor: int = 3,
        direction: str = "minimize",
        min_trials: int = 0,
    ) -> None:
        if min_step < 1 or reduction_factor < 2:
            raise ValueError("need min_step >= 1 and reduction_factor >= 2")
        self.min_step = min_step
        self.eta = reduction_factor
        self.sign = 1.0 if direction == "minimize" else -1.0
        self.min_trials = max(min_trials, reduction_factor)
        self._judged: set[tuple[int, int]] = set()  # (trial, rung) already decided

    def rung_step(self, rung: int) -> int:
        """The step at which rung ``rung`` sits."""
        return self.min_step * self.eta**rung

    def rung_values(self, history: Iterable[tuple[int, float]]) -> dict[int, tuple[int, float]]:
        """``{rung: (step, value)}``: the first finite value reported at or after each rung."""
        out: dict[int, tuple[int, float]] = {}
        for step, value in sorted(history, key=lambda sv: sv[0]):
            if value is None or not math.isfinite(value) or step < self.min_step:
                continue
            rung = int(math.floor(math.log(step / self.min_step, self.eta) + 1e-9))
            for k in range(rung + 1):
                out.setdefault(k, (step, float(value)))
        return out

    def decide(
        self, trial_id: int, histories: Mapping[int, Iterable[tuple[int, float]]]
    ) -> PruneDecision | None:
        """Whether ``trial_id`` should stop now; each (trial, rung) is judged only once."""
        mine = self.rung_values(histories.get(trial_id, []))
        if not mine:
            return None
        others = {tid: self.rung_values(h) for tid, h in histories.items()}
        for rung in sorted(mine):
            if (trial_id, rung) in self._judged:
                continue
            peers = [vals[rung][1] for vals in others.values() if rung in vals]
            if len(peers) < self.min_trials:
                return None  # too early to judge this rung (nor any later one)
            self._judged.add((trial_id, rung))
            step, value = mine[rung]
            keep = max(1, math.ceil(len(peers) / self.eta))
            rank = 1 + sum(1 for v in peers if self.sign * v < self.sign * value)
            if rank > keep:
                return PruneDecision(trial_id, rung, step, value, rank, len(peers))
        return None


def read_history(run_dir: str | Path, metric: str) -> History:
    """``(step, value)`` pairs of ``metric`` from a trial's ``metrics.jsonl`` (any record kind).

    Records without a ``step`` are numbered in order (1, 2, ...), so a command objective can
    simply append ``{"loss": 0.3}`` lines.
    """
    from aimass_hpc.runtime.metrics import read_metrics  # runtime: no login-node code

    out: History = []
    n = 0
    for rec in read_metrics(run_dir):
        n += 1
        value: Any = rec.get(metric)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        step = rec.get("step")
        out.append((int(step) if isinstance(step, int | float) else n, float(value)))
    return out
