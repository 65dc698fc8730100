"""Samplers: valid proposals, failures, out-of-order tells, batches, seeds, journal replay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aimass_hpc.common.errors import InputError
from aimass_hpc.hpo import (
    Categorical,
    Float,
    Int,
    MCTSSampler,
    OptunaTPESampler,
    RandomSampler,
    Space,
    make_sampler,
)

SAMPLERS = [MCTSSampler, RandomSampler, OptunaTPESampler]
ids = [c.__name__ for c in SAMPLERS]


def space() -> Space:
    return Space(
        {
            "lr": Float(1e-4, 1e-1, log=True),
            "layers": Int(1, 4),
            "opt": Categorical(["sgd", "adam"]),
            "momentum": Float(0, 0.99, when={"opt": ["sgd"]}),
            "x": Float(-2.0, 2.0),
        }
    )


def loss(p: dict) -> float:
    """A smooth objective with an optimum at lr=1e-2, layers=3, sgd, momentum=.9, x=.5."""
    v = (math.log10(p["lr"]) + 2) ** 2 + 0.3 * (p["layers"] - 3) ** 2 + (p["x"] - 0.5) ** 2
    return v + (0.5 if p["opt"] == "adam" else abs(p["momentum"] - 0.9))


def drive(sampler, n: int, batch: int, rng_seed: int = 0, fail_every: int = 0) -> None:
    """Ask in batches; tell each batch in a shuffled order; every k-th trial fails."""
    rng = np.random.default_rng(rng_seed)
    done = 0
    while done < n:
        trials = sampler.ask(min(batch, n - done))
        for i in rng.permutation(len(trials)):
            t = trials[i]
            if fail_every and t.id % fail_every == fail_every - 1:
                sampler.tell(t.id, None, failed=True)
            else:
                sampler.tell(t.id, loss(t.params))
        done += len(trials)


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_proposals_stay_in_the_space(cls):
    s = cls(space(), seed=1)
    drive(s, 30, batch=4, fail_every=7)
    sp = space()
    assert len(s) == 30
    for rec in s.records:
        assert sp.contains(rec.params), rec.params
        assert ("momentum" in rec.params) == (rec.params["opt"] == "sgd")
        assert isinstance(rec.params["layers"], int)


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_failures_are_recorded_and_the_search_goes_on(cls):
    s = cls(space(), seed=2)
    (a, b, c, d) = s.ask(4)
    s.tell(b.id, None)  # no value: a failure
    s.tell(c.id, float("nan"))  # NaN: a failure
    s.tell(a.id, 1.0, failed=True)  # explicit failure, value ignored
    assert s.best is None
    s.tell(d.id, 5.0)
    assert [r.state for r in s.records] == ["failed", "failed", "failed", "complete"]
    assert s.best[0].id == d.id and s.best[1] == 5.0
    more = s.ask(3)
    assert [t.id for t in more] == [4, 5, 6]


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_all_failures_still_give_valid_proposals(cls):
    s = cls(space(), seed=3)
    for _ in range(3):
        for t in s.ask(5):
            s.tell(t.id, None, failed=True)
    assert all(space().contains(t.params) for t in s.ask(5))


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_tells_in_any_order_and_misuse(cls):
    s = cls(space(), seed=4)
    trials = s.ask(6)
    for t in reversed(trials):
        s.tell(t.id, loss(t.params))
    assert s.pending == []
    best_value = min(loss(t.params) for t in trials)
    assert s.best[1] == best_value
    with pytest.raises(KeyError):
        s.tell(99, 1.0)
    with pytest.raises(ValueError, match="already"):
        s.tell(trials[0].id, 1.0)
    with pytest.raises(ValueError):
        s.ask(0)
    with pytest.raises(ValueError, match="not in the space"):
        s.register(50, {"lr": 5.0})


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_batch_proposals_are_distinct(cls):
    s = cls(space(), seed=5)
    drive(s, 16, batch=8)
    batch = s.ask(8)
    keys = {tuple(sorted(t.params.items())) for t in batch}
    assert len(keys) == 8
    assert len(s.pending) == 8


def test_mcts_batch_is_spread_out_not_near_duplicates():
    sp = Space({"a": Float(0, 1), "b": Float(0, 1)})
    s = MCTSSampler(sp, seed=6)
    for t in s.ask(20):
        s.tell(t.id, (t.params["a"] - 0.3) ** 2 + (t.params["b"] - 0.7) ** 2)
    for _ in range(3):  # later batches, when the model is confident, too
        batch = s.ask(8)
        x = np.array([[t.params["a"], t.params["b"]] for t in batch])
        gaps = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))[np.triu_indices(8, 1)]
        assert gaps.min() > 1e-3
        for t in batch:
            s.tell(t.id, (t.params["a"] - 0.3) ** 2 + (t.params["b"] - 0.7) ** 2)


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_reproducible_with_a_seed(cls):
    runs = []
    for seed in (7, 7, 8):
        s = cls(space(), seed=seed)
        drive(s, 18, batch=3)
        runs.append([r.params for r in s.records])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_replay_from_a_journal_gives_the_same_next_proposals(cls):
    original = cls(space(), seed=9)
    drive(original, 20, batch=4, fail_every=6)
    running = original.ask(3)  # still pending when the driver "crashes"
    original.tell(running[1].id, loss(running[1].params))  # one finished meanwhile
    journal = [(r.id, r.params, r.state, r.value) for r in original.records]

    rebuilt = cls(space(), seed=9)
    rng = np.random.default_rng(0)
    rebuilt.replay([journal[i] for i in rng.permutation(len(journal))])  # any order
    assert [(r.id, r.state, r.value) for r in rebuilt.records] == [
        (r.id, r.state, r.value) for r in original.records
    ]
    assert rebuilt.best == original.best
    assert [t.id for t in rebuilt.pending] == [running[0].id, running[2].id]

    nxt_a, nxt_b = original.ask(4), rebuilt.ask(4)
    assert [t.id for t in nxt_a] == [t.id for t in nxt_b] == [23, 24, 25, 26]
    assert [t.params for t in nxt_a] == [t.params for t in nxt_b]
    # And both keep agreeing after the pending trials finish.
    for s in (original, rebuilt):
        for t in [running[0], running[2], *nxt_a]:
            s.tell(t.id, loss(t.params))
    assert [t.params for t in original.ask(2)] == [t.params for t in rebuilt.ask(2)]


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_register_and_observe_by_hand(cls):
    s = cls(space(), seed=10)
    s.observe(5, {"lr": 0.01, "layers": 3, "opt": "adam", "x": 0.5}, 0.5)
    s.register(2, {"lr": 0.001, "layers": 1, "opt": "sgd", "momentum": 0.5, "x": 0.0})
    assert [t.id for t in s.ask(2)] == [6, 7]  # ids continue above the highest held
    with pytest.raises(ValueError, match="already registered"):
        s.register(5, {"lr": 0.01, "layers": 3, "opt": "adam", "x": 0.5})


@pytest.mark.parametrize("cls", SAMPLERS, ids=ids)
def test_maximize(cls):
    s = cls(space(), seed=11, direction="maximize")
    trials = s.ask(5)
    for t in trials:
        s.tell(t.id, -loss(t.params))
    assert s.best[1] == max(-loss(t.params) for t in trials)
    assert s.direction == "maximize" and s.seed == 11


def test_mcts_learns_on_a_mixed_conditional_space():
    found = {}
    for cls in (MCTSSampler, RandomSampler):
        found[cls] = []
        for seed in range(3):
            s = cls(space(), seed=seed)
            drive(s, 40, batch=4)
            found[cls].append(s.best[1])
    assert np.mean(found[MCTSSampler]) < 0.5 * np.mean(found[RandomSampler])


def test_mcts_small_discrete_space_uses_every_point_then_repeats():
    sp = Space({"c": Categorical(["a", "b", "c"]), "k": Int(0, 1)})
    s = MCTSSampler(sp, seed=13, n_init=2)
    seen = set()
    for _ in range(6):
        (t,) = s.ask()
        seen.add((t.params["c"], t.params["k"]))
        s.tell(t.id, float(t.params["k"]) + (t.params["c"] == "b"))
    assert len(seen) == 6
    (t,) = s.ask()  # exhausted: a repeat is still a valid proposal
    assert sp.contains(t.params)


def test_unseeded_samplers_pick_and_expose_a_seed():
    a, b = RandomSampler(space()), RandomSampler(space())
    assert isinstance(a.seed, int) and a.seed != b.seed


def test_make_sampler():
    assert isinstance(make_sampler("mcts", space(), seed=1), MCTSSampler)
    assert make_sampler("tpe", space(), seed=1, n_startup_trials=5).tpe_kwargs == {
        "n_startup_trials": 5
    }
    with pytest.raises(InputError, match="sampler"):
        make_sampler("cmaes", space())
    with pytest.raises(InputError, match="sampler"):
        make_sampler("mcts", space(), bogus=1)
    with pytest.raises(InputError, match="sampler"):
        make_sampler("random", space(), direction="up")


def test_mcts_replay_with_many_trials_uses_the_same_cached_models():
    # Small model caps exercise the many-trials path (frozen tree, memoised local fits).
    opts = {"max_model_points": 16, "fit_points": 8, "leaf_size": 4}
    original = MCTSSampler(space(), seed=14, **opts)
    drive(original, 40, batch=4)
    running = original.ask(2)
    journal = [(r.id, r.params, r.state, r.value) for r in original.records]
    rebuilt = MCTSSampler(space(), seed=14, **opts)
    rebuilt.replay(reversed(journal))
    assert [t.params for t in original.ask(3)] == [t.params for t in rebuilt.ask(3)]
    for s in (original, rebuilt):
        for t in running:
            s.tell(t.id, loss(t.params))
    assert [t.params for t in original.ask(2)] == [t.params for t in rebuilt.ask(2)]


def test_optuna_adapter_rebuilds_its_study_after_out_of_order_registration():
    s = OptunaTPESampler(space(), seed=15)
    first = s.ask(1)[0]
    s.observe(10, {"lr": 0.01, "layers": 3, "opt": "adam", "x": 0.5}, 0.5)
    s.observe(5, {"lr": 0.001, "layers": 1, "opt": "sgd", "momentum": 0.5, "x": 0.0}, 1.5)
    s.tell(first.id, 2.0)
    fresh = OptunaTPESampler(space(), seed=15)
    fresh.replay([(r.id, r.params, r.state, r.value) for r in s.records])
    a, b = s.ask(2), fresh.ask(2)
    assert [t.id for t in a] == [11, 12]
    assert [t.params for t in a] == [t.params for t in b]


def test_mcts_rejects_unknown_options():
    with pytest.raises(ValueError, match="transform"):
        MCTSSampler(space(), transform="log")
