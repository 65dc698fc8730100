"""Search spaces: bounds, log scales, integer rounding, conditionals, spec parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aimass_hpc.common.errors import InputError
from aimass_hpc.hpo import Categorical, Float, Int, Space


def mixed() -> Space:
    return Space(
        {
            "lr": Float(1e-4, 1e-1, log=True),
            "layers": Int(1, 4),
            "width": Int(8, 512, log=True),
            "opt": Categorical(["sgd", "adam"]),
            "momentum": Float(0, 0.99, when={"opt": ["sgd"]}),
            "nesterov": Categorical([True, False], when={"opt": ["sgd"]}),
            "dampening": Float(0.0, 0.5, when={"nesterov": [False]}),
        }
    )


def samples(space: Space, n: int = 2000, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)]


def test_samples_stay_in_bounds_and_types():
    for p in samples(mixed()):
        assert 1e-4 <= p["lr"] <= 1e-1
        assert isinstance(p["layers"], int) and 1 <= p["layers"] <= 4
        assert isinstance(p["width"], int) and 8 <= p["width"] <= 512
        assert p["opt"] in ("sgd", "adam")
        assert mixed().contains(p)


def test_log_scale_is_uniform_in_log_space():
    lr = np.log10([p["lr"] for p in samples(mixed())])
    # log-uniform on [1e-4, 1e-1]: each decade holds a third of the mass.
    counts = np.histogram(lr, bins=[-4, -3, -2, -1])[0] / len(lr)
    assert np.all(np.abs(counts - 1 / 3) < 0.05)
    width = np.log([p["width"] for p in samples(mixed())])
    assert abs(np.median(width) - 0.5 * (math.log(8) + math.log(512))) < 0.2


def test_integers_cover_every_value_evenly_including_the_ends():
    values = [p["layers"] for p in samples(mixed())]
    counts = np.bincount(values, minlength=5)[1:]
    assert counts.min() > 0.2 * len(values)  # 1..4 each about a quarter, ends included


def test_integer_rounding_of_the_unit_encoding():
    s = Space({"k": Int(1, 4), "w": Int(1, 100, log=True)})
    # Equal-width bins: [0, .25) -> 1, [.25, .5) -> 2, ...; values encode to bin centres.
    assert [s.decode([u, 0.0])["k"] for u in (0.0, 0.24, 0.26, 0.5, 0.74, 0.76, 1.0)] == [
        1, 1, 2, 3, 3, 4, 4,
    ]  # fmt: skip
    for k in range(1, 5):
        for w in (1, 2, 3, 10, 99, 100):
            assert s.decode(s.encode({"k": k, "w": w})) == {"k": k, "w": w}


def test_decode_clips_and_rounds_any_vector():
    s = mixed()
    rng = np.random.default_rng(1)
    for _ in range(200):
        vec = rng.normal(0.5, 1.0, len(s))
        vec[rng.random(len(s)) < 0.2] = np.nan
        assert s.contains(s.decode(vec))


def test_conditionals_absent_when_inactive():
    seen = {"sgd": 0, "adam": 0, "dampening": 0}
    for p in samples(mixed()):
        seen[p["opt"]] += 1
        if p["opt"] == "adam":
            assert "momentum" not in p and "nesterov" not in p and "dampening" not in p
        else:
            assert 0 <= p["momentum"] <= 0.99 and p["nesterov"] in (True, False)
            assert ("dampening" in p) == (p["nesterov"] is False)
            seen["dampening"] += "dampening" in p
    assert min(seen.values()) > 300


def test_contains_rejects_bad_points():
    s = mixed()
    good = {"lr": 0.01, "layers": 2, "width": 64, "opt": "adam"}
    assert s.contains(good)
    assert not s.contains({**good, "momentum": 0.9})  # inactive parameter present
    assert not s.contains({**good, "opt": "sgd"})  # active parameters missing
    assert not s.contains({**good, "lr": 0.5})  # out of bounds
    assert not s.contains({**good, "layers": 2.5})  # not an integer
    assert not s.contains({**good, "opt": "rmsprop"})  # not a choice
    assert not s.contains({**good, "extra": 1})  # unknown name
    sgd = {**good, "opt": "sgd", "momentum": 0.9, "nesterov": True}
    assert s.contains(sgd)
    assert not s.contains({**sgd, "dampening": 0.1})  # nested: only when nesterov is False
    assert s.contains({**sgd, "nesterov": False, "dampening": 0.1})


def test_canonical_matches_encode_decode_row_by_row():
    s = mixed()
    rng = np.random.default_rng(2)
    rows = rng.random((300, len(s))) * 1.4 - 0.2
    rows[:, list(s.names).index("opt")] = rng.integers(0, 2, 300)
    rows[rng.random(rows.shape) < 0.1] = np.nan
    fast = s.canonical(rows)
    slow = np.array([s.encode(s.decode(r)) for r in rows])
    np.testing.assert_allclose(np.nan_to_num(fast, nan=-9), np.nan_to_num(slow, nan=-9), atol=1e-9)


def test_parents_are_ordered_before_children():
    s = Space({"m": Float(0, 1, when={"opt": ["sgd"]}), "opt": Categorical(["sgd", "adam"])})
    assert s.names == ("opt", "m")


def test_from_dict_round_trip():
    table = {
        "lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "layers": {"type": "int", "low": 1, "high": 4},
        "opt": {"type": "categorical", "choices": ["sgd", "adam"]},
        "momentum": {"type": "float", "low": 0, "high": 0.99, "when": {"opt": ["sgd"]}},
    }
    s = Space.from_dict(table)
    assert s["lr"] == Float(1e-4, 0.1, log=True)
    assert s["momentum"].when == {"opt": ("sgd",)}
    assert Space.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"type": "float", "low": 1, "high": 1}, ["space.x", "below"]),
        ({"type": "float", "low": 0, "high": 1, "log": True}, ["space.x", "log"]),
        ({"type": "float", "high": 1}, ["space.x.low", "missing"]),
        ({"type": "float", "low": "a", "high": 1}, ["space.x.low", "number"]),
        ({"type": "int", "low": 0.5, "high": 3}, ["space.x", "integer"]),
        ({"type": "int", "low": 5, "high": 3}, ["space.x", "above"]),
        ({"type": "double", "low": 0, "high": 1}, ["space.x.type"]),
        ({"low": 0, "high": 1}, ["space.x.type"]),
        ({"type": "categorical", "choices": []}, ["space.x", "empty"]),
        ({"type": "categorical", "choices": ["a", "a"]}, ["space.x", "distinct"]),
        ({"type": "categorical", "choices": "abc"}, ["space.x.choices"]),
        ({"type": "float", "low": 0, "high": 1, "step": 2}, ["space.x", "step"]),
        ({"type": "float", "low": 0, "high": 1, "when": {"nope": ["a"]}}, ["space.x", "nope"]),
        (
            {"type": "float", "low": 0, "high": 1, "when": {"opt": ["rmsprop"]}},
            ["space.x", "rmsprop"],
        ),
        ({"type": "float", "low": 0, "high": 1, "when": {"opt": "sgd"}}, ["space.x.when"]),
        ("float", ["space.x"]),
    ],
)
def test_from_dict_errors_name_the_parameter(spec, words):
    table = {"opt": {"type": "categorical", "choices": ["sgd", "adam"]}, "x": spec}
    with pytest.raises(InputError) as err:
        Space.from_dict(table)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg
    assert err.value.exit_code == 2


def test_from_dict_cycle_and_empty():
    with pytest.raises(InputError, match="cycle"):
        Space.from_dict(
            {
                "a": {"type": "categorical", "choices": [1, 2], "when": {"b": [1]}},
                "b": {"type": "categorical", "choices": [1, 2], "when": {"a": [1]}},
            }
        )
    with pytest.raises(InputError, match="space"):
        Space.from_dict({})
    with pytest.raises(InputError, match="search.space.lr"):
        Space.from_dict({"lr": {"type": "float", "low": 1, "high": 0}}, where="search.space")


def test_booleans_and_numbers_are_distinct_choices():
    s = Space({"c": Categorical([True, 1, 1.5, "1"])})
    assert s.encode({"c": 1})[0] == 1 and s.encode({"c": True})[0] == 0
    decoded = [s.decode([k])["c"] for k in range(4)]
    assert [type(v) for v in decoded] == [bool, int, float, str]


@pytest.mark.parametrize("name", ["x\n", "\nx", "a b", "1x", "x{y}", "", "ü"])
def test_parameter_names_are_whole_placeholder_names(name):
    """A name must be usable as a {placeholder} and a dotted spec key (issue 10)."""
    with pytest.raises(InputError) as err:
        Space.from_dict({name: {"type": "float", "low": 0, "high": 1}})
    assert "space" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError):
        Space({name: Float(0, 1)})


@pytest.mark.parametrize("name", ["x", "_x", "task.args.hidden", "lr-2"])
def test_parameter_names_that_are_fine(name):
    assert Space.from_dict({name: {"type": "float", "low": 0, "high": 1}}).names == (name,)
