"""``OptunaTPESampler``: Optuna's TPE behind the shared ask/tell interface.

Optuna is imported when the sampler is constructed, not when ``aimass_hpc.hpo`` is. Trials
live in an in-memory Optuna study; conditional parameters are suggested define-by-run, so
inactive ones are simply never suggested. Pending trials are RUNNING trials in the study, which
TPE's constant liar (on by default) takes into account.

Journal replay: a fresh ``TPESampler`` seeded from ``(seed, trial_id)`` is used for every
proposal, and when trials are registered out of id order the study is rebuilt in id order
before the next ask, so a sampler rebuilt from a journal proposes what the original would have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from aimass_hpc.hpo.samplers import Direction, Sampler, TrialRecord
from aimass_hpc.hpo.space import Categorical, Float, Space

if TYPE_CHECKING:  # optuna is imported lazily (the search extra)
    from optuna import Study

__all__ = ["OptunaTPESampler"]


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is installed with the search extra
        from aimass_hpc.common.errors import InputError

        raise InputError("sampler 'tpe' needs optuna: pip install 'aimass-hpc[search]'") from exc
    return optuna


class OptunaTPESampler(Sampler):
    """Optuna's ``TPESampler`` (``**tpe_kwargs`` go to it; its defaults otherwise)."""

    def __init__(
        self,
        space: Space,
        seed: int | None = None,
        direction: Direction = "minimize",
        **tpe_kwargs: Any,
    ) -> None:
        super().__init__(space, seed=seed, direction=direction)
        optuna = _optuna()
        self._optuna = optuna
        # Optuna logs every finished trial at INFO; the driver has its own table.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tpe_kwargs = dict(tpe_kwargs)
        self.tpe_kwargs.pop("seed", None)
        optuna.samplers.TPESampler(**self.tpe_kwargs)  # reject bad options now, not at ask
        self._dists = {name: self._distribution(p) for name, p in space.params.items()}
        self._study: Study | None = None
        self._number: dict[int, int] = {}  # our trial id -> optuna trial number
        self._dirty = False

    def _distribution(self, p):
        d = self._optuna.distributions
        if isinstance(p, Categorical):
            return d.CategoricalDistribution(list(p.choices))
        if isinstance(p, Float):
            return d.FloatDistribution(p.low, p.high, log=p.log)
        return d.IntDistribution(p.low, p.high, log=p.log)

    # ------------------------------------------------------------------------------ study
    def _new_study(self) -> Study:
        return self._optuna.create_study(
            direction=self.direction, sampler=self._optuna.samplers.RandomSampler(0)
        )

    def _study_in_order(self) -> Study:
        """The study, rebuilt in trial-id order if registrations arrived out of order."""
        if self._study is None or self._dirty:
            study = self._study = self._new_study()
            self._number = {}
            for rec in self.records:
                self._append(study, rec)
            self._dirty = False
        return self._study

    def _append(self, study: Study, rec: TrialRecord) -> None:
        optuna = self._optuna
        state = {
            "pending": optuna.trial.TrialState.RUNNING,
            "complete": optuna.trial.TrialState.COMPLETE,
            "failed": optuna.trial.TrialState.FAIL,
        }[rec.state]
        frozen = optuna.trial.create_trial(
            state=state,
            value=rec.value if rec.state == "complete" else None,
            params=rec.params,
            distributions={k: self._dists[k] for k in rec.params},
        )
        study.add_trial(frozen)
        self._number[rec.id] = len(study.trials) - 1

    # ------------------------------------------------------------------------------ hooks
    def _propose(self, trial_id: int, rng: np.random.Generator) -> dict[str, Any]:
        study = self._study_in_order()
        seed = int(rng.integers(0, 2**31 - 1))
        study.sampler = self._optuna.samplers.TPESampler(seed=seed, **self.tpe_kwargs)
        trial = study.ask()
        self._number[trial_id] = trial.number
        params: dict[str, Any] = {}
        for name, p in self.space.params.items():
            if not self.space.is_active(name, params):
                continue
            if isinstance(p, Categorical):
                params[name] = trial.suggest_categorical(name, list(p.choices))
            elif isinstance(p, Float):
                params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
            else:
                params[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
        return params

    def _on_register(self, rec: TrialRecord, *, proposed: bool) -> None:
        if proposed or self._study is None or self._dirty:
            return  # proposals are already in the study; a missing study is built lazily
        if rec.id < max(self._number, default=-1):
            self._dirty = True  # out of id order: rebuild before the next ask
        else:
            self._append(self._study, rec)

    def _on_tell(self, rec: TrialRecord) -> None:
        if self._study is None or self._dirty:
            return
        number = self._number[rec.id]
        if rec.state == "complete":
            self._study.tell(number, rec.value)
        else:
            self._study.tell(number, state=self._optuna.trial.TrialState.FAIL)
