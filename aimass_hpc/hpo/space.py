"""Search spaces: typed, bounded, optionally conditional hyperparameters.

A ``Space`` maps names to ``Float``, ``Int`` or ``Categorical`` parameters. A parameter with
``when={"opt": ["sgd"]}`` is *active* only when ``opt`` is active and takes one of those values;
inactive parameters are absent from a trial's ``params`` dict.

Samplers work in an encoded form: one number per parameter. Numeric parameters map to the unit
interval (after a log transform when ``log=True``; integers map to equal-width bins so rounding is
unbiased), categoricals to their choice index, and inactive parameters to NaN. ``encode`` and
``decode`` convert between the two, and ``decode`` is the single place where conditionals,
clipping and integer rounding are applied, so a sampler can never produce an invalid trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import PARAM_NAME, key_path, shown

Scalar = str | int | float | bool

__all__ = ["Categorical", "Float", "Int", "Param", "Space"]


def _when(when: Mapping[str, Sequence[Any]] | None) -> dict[str, tuple[Any, ...]]:
    """Normalise a ``when`` condition to {parent: tuple(values)}."""
    if not when:
        return {}
    out: dict[str, tuple[Any, ...]] = {}
    for parent, values in when.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            values = [values]
        out[str(parent)] = tuple(values)
    return out


@dataclass(frozen=True)
class Float:
    """A real parameter in ``[low, high]``; ``log=True`` samples uniformly in log space."""

    low: float
    high: float
    log: bool = False
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "when", _when(self.when))
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    def _check(self) -> str | None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "low and high must be finite numbers"
        if not self.low < self.high:
            return f"low ({self.low:g}) must be below high ({self.high:g})"
        if self.log and self.low <= 0:
            return f"log scale needs low > 0 (got {self.low:g})"
        return None

    def _bounds(self) -> tuple[float, float]:
        if self.log:
            return math.log(self.low), math.log(self.high)
        return self.low, self.high

    def to_unit(self, value: Any) -> float:
        """Map a value to [0, 1]."""
        a, b = self._bounds()
        t = math.log(value) if self.log else float(value)
        return min(1.0, max(0.0, (t - a) / (b - a)))

    def from_unit(self, u: float) -> float:
        """Map [0, 1] back to a value (clipped to the bounds)."""
        a, b = self._bounds()
        t = a + min(1.0, max(0.0, float(u))) * (b - a)
        v = math.exp(t) if self.log else t
        return min(self.high, max(self.low, v))

    def valid(self, value: Any) -> bool:
        """True when ``value`` is a number inside the bounds."""
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
            return False
        return self.low <= float(value) <= self.high

    def to_dict(self) -> dict[str, Any]:
        """The spec-table form (inverse of ``Space.from_dict`` for this parameter)."""
        d: dict[str, Any] = {"type": "float", "low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        return d


@dataclass(frozen=True)
class Int:
    """An integer parameter in ``[low, high]`` (inclusive); ``log=True`` favours small values."""

    low: int
    high: int
    log: bool = False
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "when", _when(self.when))

    def _check(self) -> str | None:
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                if isinstance(v, float) and v.is_integer():
                    object.__setattr__(self, name, int(v))
                    continue
                return f"{name} must be an integer (got {v!r})"
        if not self.low <= self.high:
            return f"low ({self.low}) must not be above high ({self.high})"
        if self.log and self.low < 1:
            return f"log scale needs low >= 1 (got {self.low})"
        return None

    def _bounds(self) -> tuple[float, float]:
        # Each integer owns an equal-width bin (in log space for log=True), so decoding a
        # uniform number rounds without favouring the end points.
        if self.log:
            return math.log(self.low - 0.5), math.log(self.high + 0.5)
        return self.low - 0.5, self.high + 0.5

    def to_unit(self, value: Any) -> float:
        """Map a value to the centre of its bin in [0, 1]."""
        a, b = self._bounds()
        t = math.log(value) if self.log else float(value)
        return min(1.0, max(0.0, (t - a) / (b - a)))

    def from_unit(self, u: float) -> int:
        """Map [0, 1] back to an integer (rounded, clipped to the bounds)."""
        a, b = self._bounds()
        t = a + min(1.0, max(0.0, float(u))) * (b - a)
        v = math.exp(t) if self.log else t
        return int(min(self.high, max(self.low, math.floor(v + 0.5))))

    def valid(self, value: Any) -> bool:
        """True when ``value`` is an integer inside the bounds."""
        if isinstance(value, bool):
            return False
        if isinstance(value, float | np.floating):
            if not float(value).is_integer():
                return False
        elif not isinstance(value, int | np.integer):
            return False
        return self.low <= int(value) <= self.high

    def to_dict(self) -> dict[str, Any]:
        """The spec-table form."""
        d: dict[str, Any] = {"type": "int", "low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        return d


@dataclass(frozen=True)
class Categorical:
    """One of a fixed list of choices (strings, numbers or booleans); unordered."""

    choices: tuple[Any, ...]
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "when", _when(self.when))
        choices = self.choices
        if isinstance(choices, str | bytes) or not isinstance(choices, Sequence):
            choices = (choices,)
        object.__setattr__(self, "choices", tuple(choices))

    def _check(self) -> str | None:
        if not self.choices:
            return "choices must not be empty"
        for c in self.choices:
            if not isinstance(c, str | int | float | bool):
                return f"choices must be strings, numbers or booleans (got {c!r})"
        if len(set(map(_choice_key, self.choices))) != len(self.choices):
            return "choices must be distinct"
        return None

    def index(self, value: Any) -> int:
        """The position of ``value`` among the choices (ValueError when absent)."""
        key = _choice_key(value)
        for i, c in enumerate(self.choices):
            if _choice_key(c) == key:
                return i
        raise ValueError(f"{value!r} is not one of {list(self.choices)!r}")

    def valid(self, value: Any) -> bool:
        """True when ``value`` is one of the choices."""
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """The spec-table form."""
        return {"type": "categorical", "choices": list(self.choices)}


def _choice_key(value: Any) -> tuple[str, Any]:
    # True == 1 in Python; keep booleans, ints and floats apart so {True, 1} are two choices.
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float | np.integer | np.floating):
        return ("num", float(value))
    return (type(value).__name__, value)


Param = Float | Int | Categorical

_TYPES = {"float": Float, "int": Int, "categorical": Categorical}
_KEYS = {
    "float": {"type", "low", "high", "log", "when"},
    "int": {"type", "low", "high", "log", "when"},
    "categorical": {"type", "choices", "when"},
}


class Space:
    """An ordered set of named parameters; parents of conditionals come before children."""

    def __init__(self, params: Mapping[str, Param], *, where: str = "space") -> None:
        if not params:
            raise InputError(f"{where}: a search space needs at least one parameter")
        for name, p in params.items():
            at = key_path(where, name)
            # A name is a {placeholder} in commands and a dotted key of a training spec.
            PARAM_NAME.check(name, at)
            if not isinstance(p, Float | Int | Categorical):
                raise InputError(f"{at}: expected Float, Int or Categorical, got {shown(p)}")
            problem = p._check()
            if problem:
                raise InputError(f"{at}: {problem}")
        self._where = where
        self._params: dict[str, Param] = {}
        for name in self._order(params, where):
            self._params[name] = params[name]
        self.names: tuple[str, ...] = tuple(self._params)
        self._index = {n: i for i, n in enumerate(self.names)}
        # Encoded-form metadata, used by samplers.
        self.is_categorical = np.array([isinstance(p, Categorical) for p in self.params.values()])
        self.n_choices = np.array(
            [len(p.choices) if isinstance(p, Categorical) else 0 for p in self.params.values()]
        )
        self.is_conditional = np.array([bool(p.when) for p in self.params.values()])

    @staticmethod
    def _order(params: Mapping[str, Param], where: str) -> list[str]:
        """Definition order, moved just enough that every parent precedes its children."""
        for name, p in params.items():
            for parent, values in p.when.items():
                if parent not in params:
                    raise InputError(f"{where}.{name}: 'when' names unknown parameter {parent!r}")
                if parent == name:
                    raise InputError(f"{where}.{name}: 'when' cannot refer to itself")
                if not values:
                    raise InputError(f"{where}.{name}: 'when' needs values for {parent!r}")
                for v in values:
                    if not params[parent].valid(v):
                        raise InputError(
                            f"{where}.{name}: 'when' value {v!r} is not a valid {parent!r}"
                        )
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise InputError(f"{where}.{n}: 'when' conditions form a cycle")
            state[n] = 1
            for parent in params[n].when:
                visit(parent)
            state[n] = 2
            order.append(n)

        for n in params:
            visit(n)
        return order

    # ----------------------------------------------------------------- construction / export
    @classmethod
    def from_dict(cls, table: Mapping[str, Any], *, where: str = "space") -> Space:
        """Build a space from a spec table (e.g. the ``[space]`` table of a TOML spec).

        Each entry is ``name = {type = "float"|"int"|"categorical", ...}`` with ``low``/``high``
        (and optional ``log``) for numbers, ``choices`` for categoricals and an optional
        ``when = {parent = [values]}``. Raises ``InputError`` naming ``where.name``.
        """
        if not isinstance(table, Mapping) or not table:
            raise InputError(f"{where}: expected a table of parameters")
        params: dict[str, Param] = {}
        for name, spec in table.items():
            at = key_path(where, name)
            PARAM_NAME.check(name, at)
            if not isinstance(spec, Mapping):
                raise InputError(f'{at}: expected a table like {{type = "float", ...}}')
            kind = spec.get("type")
            if not isinstance(kind, str) or kind not in _TYPES:
                raise InputError(
                    f"{at}.type: expected one of float, int, categorical (got {shown(kind)})"
                )
            extra = set(spec) - _KEYS[kind]
            if extra:
                raise InputError(
                    f"{at}: unknown key(s) {', '.join(sorted(map(str, extra)))} for a {kind}"
                )
            when = spec.get("when")
            if when is not None and (
                not isinstance(when, Mapping)
                or not all(
                    isinstance(v, Sequence) and not isinstance(v, str) for v in when.values()
                )
            ):
                raise InputError(f"{at}.when: expected a table like {{parent = [values]}}")
            cond = _when(when)
            if kind == "categorical":
                choices = spec.get("choices")
                if not isinstance(choices, Sequence) or isinstance(choices, str):
                    raise InputError(f"{at}.choices: expected a list of values")
                params[name] = Categorical(tuple(choices), when=cond)
                continue
            for key in ("low", "high"):
                v = spec.get(key)
                if v is None:
                    raise InputError(f"{at}.{key}: missing")
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise InputError(f"{at}.{key}: expected a number (got {v!r})")
            log = spec.get("log", False)
            if not isinstance(log, bool):
                raise InputError(f"{at}.log: expected true or false (got {log!r})")
            if kind == "float":
                params[name] = Float(spec["low"], spec["high"], log=log, when=cond)
            else:
                params[name] = Int(spec["low"], spec["high"], log=log, when=cond)
        return cls(params, where=where)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The spec-table form: ``Space.from_dict(space.to_dict())`` is an equal space."""
        out = {}
        for name, p in self._params.items():
            d = p.to_dict()
            if p.when:
                d["when"] = {k: list(v) for k, v in p.when.items()}
            out[name] = d
        return out

    # ----------------------------------------------------------------------------- mapping
    @property
    def params(self) -> dict[str, Param]:
        """Name -> parameter, parents before children."""
        return self._params

    def __getitem__(self, name: str) -> Param:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Space) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Space({self._params!r})"

    # ------------------------------------------------------------------------ conditionals
    def _is_active(self, p: Param, values: Mapping[str, Any], active: set[str]) -> bool:
        for parent, allowed in p.when.items():
            if parent not in active:
                return False
            key = _choice_key(values[parent])
            if key not in {_choice_key(a) for a in allowed}:
                return False
        return True

    def is_active(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether ``name`` is active given its ancestors' values in ``params``."""
        p = self._params[name]
        for parent, allowed in p.when.items():
            if parent not in params or not self.is_active(parent, params):
                return False
            if _choice_key(params[parent]) not in {_choice_key(a) for a in allowed}:
                return False
        return True

    def active(self, params: Mapping[str, Any]) -> list[str]:
        """Names that are active given the (parent) values in ``params``."""
        active: set[str] = set()
        out = []
        for name, p in self._params.items():
            if name in params and self._is_active(p, params, active):
                active.add(name)
                out.append(name)
        return out

    def contains(self, params: Mapping[str, Any]) -> bool:
        """True when ``params`` has exactly the active parameters, each valid."""
        active: set[str] = set()
        for name, p in self._params.items():
            if self._is_active(p, params, active):
                if name not in params or not p.valid(params[name]):
                    return False
                active.add(name)
            elif name in params:
                return False
        return set(params) <= set(self._params)

    # ------------------------------------------------------------------------- sampling
    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One uniformly random point (log-uniform for log params); inactive ones absent."""
        u = rng.random(len(self._params))
        vec = np.where(self.is_categorical, np.floor(u * np.maximum(self.n_choices, 1)), u)
        return self.decode(vec)

    # ------------------------------------------------------------------------- encoding
    def encode(self, params: Mapping[str, Any]) -> np.ndarray:
        """One float per parameter: unit interval, category index, or NaN when inactive."""
        vec = np.full(len(self._params), np.nan)
        active: set[str] = set()
        for i, (name, p) in enumerate(self._params.items()):
            if name not in params or not self._is_active(p, params, active):
                continue
            active.add(name)
            value = params[name]
            vec[i] = p.index(value) if isinstance(p, Categorical) else p.to_unit(value)
        return vec

    def decode(self, vec: Sequence[float] | np.ndarray) -> dict[str, Any]:
        """Parameters from an encoded vector, with conditionals, rounding and clipping applied.

        A NaN for a parameter that turns out active (its parent changed) decodes to the
        middle of its range, so any vector decodes to a valid point.
        """
        out: dict[str, Any] = {}
        active: set[str] = set()
        for i, (name, p) in enumerate(self._params.items()):
            if not self._is_active(p, out, active):
                continue
            active.add(name)
            x = float(vec[i])
            if isinstance(p, Categorical):
                k = 0 if math.isnan(x) else int(min(len(p.choices) - 1, max(0, round(x))))
                out[name] = p.choices[k]
            else:
                out[name] = p.from_unit(0.5 if math.isnan(x) else x)
        return out

    def canonical(self, vecs: np.ndarray) -> np.ndarray:
        """Vectorised ``encode(decode(v))`` for each row: the points the rows stand for.

        Rounds integers to their bin centres and categories to valid codes, clips to the unit
        interval, sets inactive parameters to NaN and gives parameters that became active a
        valid value (the middle when the row held NaN). Works column by column, so it is cheap
        for thousands of candidate rows.
        """
        x = np.array(vecs, dtype=float, copy=True)
        single = x.ndim == 1
        if single:
            x = x[None, :]
        n = len(x)
        active = np.ones((n, len(self._params)), dtype=bool)
        for i, p in enumerate(self._params.values()):
            act = np.ones(n, dtype=bool)
            for parent, allowed in p.when.items():
                j = self._index[parent]
                act &= active[:, j] & self._column_in(j, x[:, j], allowed)
            active[:, i] = act
            col = x[:, i]
            if isinstance(p, Categorical):
                col = np.clip(np.round(np.nan_to_num(col, nan=0.0)), 0, len(p.choices) - 1)
            else:
                col = np.clip(np.nan_to_num(col, nan=0.5), 0.0, 1.0)
                if isinstance(p, Int):
                    a, b = p._bounds()
                    v = a + col * (b - a)
                    v = np.exp(v) if p.log else v
                    v = np.clip(np.floor(v + 0.5), p.low, p.high)
                    col = ((np.log(v) if p.log else v) - a) / (b - a)
            col[~act] = np.nan
            x[:, i] = col
        return x[0] if single else x

    def _column_in(self, j: int, col: np.ndarray, allowed: tuple[Any, ...]) -> np.ndarray:
        """Rows whose (canonical) value of parameter ``j`` is one of ``allowed``."""
        p = self._params[self.names[j]]
        if isinstance(p, Categorical):
            return np.isin(col, [p.index(a) for a in allowed])
        values = np.array([p.from_unit(u) if not math.isnan(u) else math.nan for u in col])
        return np.isin(values, np.asarray(allowed, dtype=float))
