"""The ask/tell interface every sampler shares, and ``RandomSampler``.

A sampler proposes trials (``ask``) and learns their outcomes (``tell``); it never runs
anything. The driver that runs trials as batch jobs owns the journal; the sampler is rebuilt
from that journal after a crash.

Rebuilding from a journal
-------------------------
A sampler's knowledge is exactly the set of trial records it holds: ``(trial_id, params)``
plus, once known, a value or a failure. There is no hidden state: every proposal is a
deterministic function of ``(seed, trial_id, the records held)``; the random generator for
trial ``k`` is derived from ``(seed, k)`` rather than advanced from ask to ask, and records are
processed in trial-id order whatever order they arrived in. So a fresh sampler with the same
space, seed and direction that is fed the journal proposes exactly what the crashed one would
have proposed next::

    sampler = MCTSSampler(space, seed=journal.seed, direction=journal.direction)
    for rec in journal.records():             # any order
        sampler.register(rec.id, rec.params)  # proposed earlier (pending until told)
        if rec.state == "complete":
            sampler.tell(rec.id, rec.value)
        elif rec.state == "failed":
            sampler.tell(rec.id, None, failed=True)
    # or simply: sampler.replay(records) with (id, params, state, value) tuples

``observe(trial_id, params, value)`` is register-and-tell in one call (also for trials the
user evaluated by hand). ``ask`` hands out ids one above the highest id held, so resumed
searches never reuse an id. A trial that was pending when the driver died and is re-queued
keeps its id and params (``register``); one that is abandoned should be told as failed.
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from aimass_hpc.hpo.space import Space

__all__ = ["RandomSampler", "Sampler", "Trial", "TrialRecord"]

Direction = Literal["minimize", "maximize"]
State = Literal["pending", "complete", "failed"]


@dataclass(frozen=True)
class Trial:
    """One proposed configuration: a search-unique ``id`` and its ``params``."""

    id: int
    params: dict[str, Any]


@dataclass
class TrialRecord:
    """What a sampler knows about one trial. ``value`` is in the user's sign."""

    id: int
    params: dict[str, Any]
    state: State = "pending"
    value: float | None = None


class Sampler(ABC):
    """Base class: bookkeeping of trials, ids, seeds and the best trial.

    Subclasses implement ``_propose(trial_id, rng)`` and may use ``_loss`` (values turned into
    losses to minimise, failures as NaN) and the ``records`` in id order.
    """

    def __init__(
        self,
        space: Space,
        *,
        seed: int | None = None,
        direction: Direction = "minimize",
    ) -> None:
        if not isinstance(space, Space):
            raise TypeError("space must be an aimass_hpc.hpo.Space")
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', not {direction!r}")
        self.space = space
        self.direction: Direction = direction
        # A seed is always concrete so the driver can journal it and resume identically.
        self.seed: int = int(seed) if seed is not None else secrets.randbits(63)
        self._records: dict[int, TrialRecord] = {}
        self._version = 0  # bumped whenever a result arrives: caches key on it

    # ---------------------------------------------------------------------- public API
    def ask(self, n: int = 1) -> list[Trial]:
        """Propose ``n`` new trials, each aware of all trials still pending (batch-safe)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, not {n!r}")
        out = []
        for _ in range(n):
            tid = self.next_id
            params = self._propose(tid, self._rng(tid))
            self._add(tid, dict(params), proposed=True)
            out.append(Trial(tid, dict(params)))
        return out

    def tell(self, trial_id: int, value: float | None, *, failed: bool = False) -> None:
        """Record the outcome of a pending trial, in any order.

        ``value=None``, a NaN/infinite value or ``failed=True`` records a failure: the sampler
        avoids that region but does not count it as a result.
        """
        rec = self._records.get(trial_id)
        if rec is None:
            raise KeyError(f"unknown trial id {trial_id!r}: ask or register it first")
        if rec.state != "pending":
            raise ValueError(f"trial {trial_id} was already told ({rec.state})")
        v = None if value is None else float(value)
        if failed or v is None or not math.isfinite(v):
            rec.state, rec.value = "failed", None
        else:
            rec.state, rec.value = "complete", v
        self._version += 1
        self._on_tell(rec)

    def register(self, trial_id: int, params: Mapping[str, Any]) -> Trial:
        """Add a trial proposed earlier (journal replay) as pending; tell it later."""
        if isinstance(trial_id, bool) or not isinstance(trial_id, int) or trial_id < 0:
            raise ValueError(f"trial id must be a non-negative integer, not {trial_id!r}")
        if trial_id in self._records:
            raise ValueError(f"trial {trial_id} is already registered")
        if not self.space.contains(params):
            raise ValueError(f"trial {trial_id}: params {dict(params)!r} are not in the space")
        self._add(trial_id, dict(params), proposed=False)
        return Trial(trial_id, dict(params))

    def observe(
        self, trial_id: int, params: Mapping[str, Any], value: float | None, *, failed=False
    ) -> None:
        """``register`` then ``tell``: a finished trial from a journal or evaluated by hand."""
        self.register(trial_id, params)
        self.tell(trial_id, value, failed=failed)

    def replay(self, records: Iterable[Any]) -> None:
        """Feed journal records: ``(id, params, state, value)`` tuples or ``TrialRecord``s.

        ``state`` is ``"pending"``, ``"complete"`` or ``"failed"``. Order does not matter.
        """
        for rec in records:
            if isinstance(rec, TrialRecord):
                tid, params, state, value = rec.id, rec.params, rec.state, rec.value
            else:
                tid, params, state, value = rec
            self.register(tid, params)
            if state == "complete":
                self.tell(tid, value)
            elif state == "failed":
                self.tell(tid, None, failed=True)
            elif state != "pending":
                raise ValueError(f"trial {tid}: unknown state {state!r}")

    @property
    def best(self) -> tuple[Trial, float] | None:
        """The best completed trial and its value, or None before any result (ties: lowest id)."""
        best: tuple[TrialRecord, float] | None = None
        for rec in self.records:
            # A complete record always holds a float (``tell``); the None check narrows it.
            if rec.state != "complete" or rec.value is None:
                continue
            if best is None or self._sign * rec.value < self._sign * best[1]:
                best = rec, rec.value
        if best is None:
            return None
        return Trial(best[0].id, dict(best[0].params)), best[1]

    @property
    def records(self) -> list[TrialRecord]:
        """All trials held, in id order."""
        return [self._records[k] for k in sorted(self._records)]

    @property
    def pending(self) -> list[Trial]:
        """Trials proposed or registered but not told yet."""
        return [Trial(r.id, dict(r.params)) for r in self.records if r.state == "pending"]

    @property
    def next_id(self) -> int:
        """The id the next ``ask`` hands out (one above the highest held)."""
        return max(self._records, default=-1) + 1

    def __len__(self) -> int:
        return len(self._records)

    # -------------------------------------------------------------------- for subclasses
    @property
    def _sign(self) -> float:
        return 1.0 if self.direction == "minimize" else -1.0

    def _loss(self, rec: TrialRecord) -> float:
        """The record's value as a loss to minimise; NaN for failed or pending."""
        if rec.state != "complete" or rec.value is None:
            return math.nan
        return self._sign * rec.value

    def _rng(self, trial_id: int) -> np.random.Generator:
        """The generator for proposing ``trial_id``: a function of (seed, id) only."""
        return np.random.default_rng([self.seed & (2**63 - 1), trial_id, 0x5EA7C4])

    def _add(self, trial_id: int, params: dict[str, Any], *, proposed: bool) -> None:
        self._records[trial_id] = TrialRecord(trial_id, params)
        self._on_register(self._records[trial_id], proposed=proposed)

    def _on_register(self, rec: TrialRecord, *, proposed: bool) -> None:
        """Hook: a trial became pending (``proposed`` by this sampler's ask, or registered)."""
        return None

    def _on_tell(self, rec: TrialRecord) -> None:
        """Hook: a pending trial got its result (``rec.state`` is complete or failed)."""
        return None

    @abstractmethod
    def _propose(self, trial_id: int, rng: np.random.Generator) -> dict[str, Any]:
        """Params for a new trial; all earlier proposals are registered (pending or told)."""


class RandomSampler(Sampler):
    """Independent uniform samples (log-uniform on log scales): the baseline to beat."""

    def _propose(self, trial_id: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.space.sample(rng)
