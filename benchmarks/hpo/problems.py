"""Benchmark problems: synthetic functions with known optima and small scikit-learn HPO tasks.

Every problem is a ``Problem`` with a ``Space``, an objective to minimise and its optimum
``f_star`` (``None`` for the real tasks: the benchmark then uses the best value any method
ever reached there). Real tasks are deterministic (fixed CV folds and model seeds) and cache
their evaluations on disk, so baselines are not re-trained when the benchmark is run again.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aimass_hpc.hpo import Categorical, Float, Int, Space


@dataclass
class Problem:
    """A named minimisation problem over a space."""

    name: str
    group: str  # "synthetic" or "hpo"
    space: Space
    objective: Callable[[dict[str, Any]], float]
    f_star: float | None


# ------------------------------------------------------------------------------- synthetic
def _vec(params: dict[str, Any], d: int) -> np.ndarray:
    return np.array([params[f"x{i}"] for i in range(d)], dtype=float)


def _box(d: int, low: float, high: float) -> Space:
    return Space({f"x{i}": Float(low, high) for i in range(d)})


def branin(p: dict[str, Any]) -> float:
    """Branin-Hoo on [-5, 10] x [0, 15]; three global minima of 0.397887."""
    x1, x2 = p["x0"], p["x1"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_H6_A = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8],
     [17, 8, 0.05, 10, 0.1, 14]]
)  # fmt: skip
_H6_P = 1e-4 * np.array(
    [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
     [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]
)  # fmt: skip
_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(p: dict[str, Any]) -> float:
    """Hartmann-6 on [0, 1]^6; minimum -3.32237."""
    x = _vec(p, 6)
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


def ackley(p: dict[str, Any], d: int = 10) -> float:
    """Ackley on [-32.768, 32.768]^d; minimum 0 at the origin."""
    x = _vec(p, d)
    a = -20 * math.exp(-0.2 * math.sqrt(np.mean(x * x)))
    return float(a - math.exp(np.mean(np.cos(2 * math.pi * x))) + 20 + math.e)


def levy(p: dict[str, Any], d: int = 10) -> float:
    """Levy on [-10, 10]^d; minimum 0 at (1, ..., 1)."""
    w = 1 + (_vec(p, d) - 1) / 4
    head = math.sin(math.pi * w[0]) ** 2
    mid = np.sum((w[:-1] - 1) ** 2 * (1 + 10 * np.sin(math.pi * w[:-1] + 1) ** 2))
    tail = (w[-1] - 1) ** 2 * (1 + math.sin(2 * math.pi * w[-1]) ** 2)
    return float(head + mid + tail)


def rosenbrock(p: dict[str, Any], d: int = 10) -> float:
    """Rosenbrock on [-5, 10]^d; minimum 0 at (1, ..., 1)."""
    x = _vec(p, d)
    return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


def synthetic() -> list[Problem]:
    """The five synthetic functions of the issue."""
    return [
        Problem(
            "branin2",
            "synthetic",
            Space({"x0": Float(-5.0, 10.0), "x1": Float(0.0, 15.0)}),
            branin,
            0.397887,
        ),
        Problem("hartmann6", "synthetic", _box(6, 0, 1), hartmann6, -3.32237),
        Problem("ackley10", "synthetic", _box(10, -32.768, 32.768), ackley, 0.0),
        Problem("levy10", "synthetic", _box(10, -10, 10), levy, 0.0),
        Problem("rosenbrock10", "synthetic", _box(10, -5, 10), rosenbrock, 0.0),
    ]


# ------------------------------------------------------------------------------- real HPO
def mlp_space() -> Space:
    """MLP: log-scaled learning rate and L2, width, activation, solver (momentum if sgd)."""
    return Space(
        {
            "learning_rate_init": Float(1e-4, 1e-1, log=True),
            "alpha": Float(1e-6, 1e-1, log=True),
            "width": Int(8, 256, log=True),
            "layers": Int(1, 2),
            "activation": Categorical(["relu", "tanh", "logistic"]),
            "solver": Categorical(["adam", "sgd"]),
            "momentum": Float(0.0, 0.99, when={"solver": ["sgd"]}),
        }
    )


def rf_space() -> Space:
    """Random forest: trees, depth, leaf size, feature fraction, criterion, bootstrap."""
    return Space(
        {
            "n_estimators": Int(10, 150, log=True),
            "max_depth": Int(2, 32, log=True),
            "min_samples_leaf": Int(1, 20, log=True),
            "max_features": Float(0.05, 1.0),
            "criterion": Categorical(["gini", "entropy"]),
            "bootstrap": Categorical([True, False]),
        }
    )


class _CachedTask:
    """A 3-fold CV error rate, memoised in memory and in a JSON-lines file."""

    def __init__(self, name: str, dataset: str, model: str, cache_dir: Path | None) -> None:
        self.name, self.dataset, self.model = name, dataset, model
        self._mem: dict[str, float] = {}
        self._data = None
        self._file = cache_dir / f"{name}.jsonl" if cache_dir else None
        if self._file and self._file.exists():
            for line in self._file.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
                self._mem[rec["k"]] = rec["v"]

    @property
    def cached_best(self) -> float | None:
        return min(self._mem.values()) if self._mem else None

    def __call__(self, params: dict[str, Any]) -> float:
        key = json.dumps(params, sort_keys=True)
        if key in self._mem:
            return self._mem[key]
        value = self._evaluate(params)
        self._mem[key] = value
        if self._file:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            # One short O_APPEND write per line: safe with several worker processes.
            fd = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps({"k": key, "v": value}) + "\n").encode())
            finally:
                os.close(fd)
        return value

    def _evaluate(self, params: dict[str, Any]) -> float:
        from sklearn.datasets import load_breast_cancer, load_digits
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self._data is None:
            loader = load_digits if self.dataset == "digits" else load_breast_cancer
            self._data = loader(return_X_y=True)
        x, y = self._data
        if self.model == "mlp":
            est = make_pipeline(
                StandardScaler(),
                MLPClassifier(
                    hidden_layer_sizes=(params["width"],) * params["layers"],
                    activation=params["activation"],
                    solver=params["solver"],
                    alpha=params["alpha"],
                    learning_rate_init=params["learning_rate_init"],
                    momentum=params.get("momentum", 0.9),
                    max_iter=40,
                    random_state=0,
                ),
            )
        else:
            est = RandomForestClassifier(
                n_estimators=params["n_estimators"],
                max_depth=params["max_depth"],
                min_samples_leaf=params["min_samples_leaf"],
                max_features=params["max_features"],
                criterion=params["criterion"],
                bootstrap=params["bootstrap"],
                random_state=0,
                n_jobs=1,
            )
        cv = StratifiedKFold(3, shuffle=True, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            acc = cross_val_score(est, x, y, cv=cv, error_score=0.0).mean()
        return float(1.0 - acc)


def real(cache_dir: Path | None) -> list[Problem]:
    """The scikit-learn tasks: error rate (1 - accuracy) of 3-fold CV, minimised."""
    out = []
    for dataset in ("digits", "breast_cancer"):
        for model, space in (("mlp", mlp_space()), ("rf", rf_space())):
            name = f"{dataset}-{model}"
            out.append(
                Problem(name, "hpo", space, _CachedTask(name, dataset, model, cache_dir), None)
            )
    return out


def all_problems(cache_dir: Path | None) -> dict[str, Problem]:
    """Every problem by name."""
    return {p.name: p for p in synthetic() + real(cache_dir)}
