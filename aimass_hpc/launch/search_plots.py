"""Search plots: best-so-far and parallel coordinates, as PNG files (matplotlib, no display).

Both read only the replayed journal (:class:`~aimass_hpc.launch.journal.SearchState`), so they
work while the search runs and after it ended, from any machine that sees the search directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import ConflictError
from aimass_hpc.hpo.space import Categorical, Int, Space
from aimass_hpc.launch.journal import FINISHED, SearchState, TrialRecord


def _finished(state: SearchState) -> list[TrialRecord]:
    done = [t for t in state.trials.values() if t.state == FINISHED and t.value is not None]
    # completion order: what the researcher saw happen
    return sorted(done, key=lambda t: (t.ended_at or 0.0, t.id))


def best_so_far(values: list[float], direction: str) -> list[float]:
    """Running best of ``values`` in ``direction``."""
    out: list[float] = []
    pick = min if direction == "minimize" else max
    for v in values:
        out.append(v if not out else pick(out[-1], v))
    return out


def plot_best_so_far(state: SearchState, direction: str, path: str | Path, title: str) -> Path:
    """Each finished trial's value (dots) and the best so far (a step line), by completion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = _finished(state)
    if not done:
        raise ConflictError("no finished trial yet: nothing to plot")
    values = [float(t.value) for t in done]  # type: ignore[arg-type]
    xs = list(range(1, len(done) + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.scatter(xs, values, s=18, color="tab:blue", alpha=0.6, label="trial value")
    ax.step(xs, best_so_far(values, direction), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("objective")
    ax.set_title(f"{title}: best so far ({direction})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def axis_position(space: Space | None, name: str, values: list[Any]) -> tuple[list[float], Any]:
    """Map one parameter's values to [0, 1]; returns positions and (ticks, labels)."""
    param = space.params.get(name) if space is not None else None
    present = [v for v in values if v is not None]
    if isinstance(param, Categorical) or any(isinstance(v, str | bool) for v in present):
        choices = (
            list(param.choices)
            if isinstance(param, Categorical)
            else sorted({str(v) for v in present})
        )
        keys = [str(c) for c in choices]
        n = max(1, len(keys) - 1)
        pos = [math.nan if v is None else keys.index(str(v)) / n for v in values]
        return pos, ([i / n for i in range(len(keys))], keys)
    if param is not None:
        pos = [math.nan if v is None else param.to_unit(v) for v in values]
        lows = param.from_unit(0.0), param.from_unit(1.0)
        fmt = "{:d}" if isinstance(param, Int) else "{:.3g}"
        return pos, ([0.0, 1.0], [fmt.format(lows[0]), fmt.format(lows[1])])
    nums = [float(v) for v in present]
    lo, hi = (min(nums), max(nums)) if nums else (0.0, 1.0)
    span = (hi - lo) or 1.0
    pos = [math.nan if v is None else (float(v) - lo) / span for v in values]
    return pos, ([0.0, 1.0], [f"{lo:.3g}", f"{hi:.3g}"])


def plot_parallel_coordinates(
    state: SearchState, direction: str, path: str | Path, title: str, space: Space | None = None
) -> Path:
    """One line per finished trial across every parameter axis and the objective, coloured by
    value (best is darkest). Inactive conditional parameters leave a gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colormaps, colors

    done = _finished(state)
    if not done:
        raise ConflictError("no finished trial yet: nothing to plot")
    names = list(space.names) if space is not None else sorted({k for t in done for k in t.params})
    columns: list[list[float]] = []
    ticks = []
    for name in names:
        pos, tk = axis_position(space, name, [t.params.get(name) for t in done])
        columns.append(pos)
        ticks.append(tk)
    values = [float(t.value) for t in done]  # type: ignore[arg-type]
    vpos, vtk = axis_position(None, "objective", values)
    columns.append(vpos)
    ticks.append(vtk)
    labels = [*names, "objective"]

    norm = colors.Normalize(vmin=min(values), vmax=max(values))
    cmap = colormaps["viridis_r" if direction == "minimize" else "viridis"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(labels)), 4.5), dpi=110)
    xs = list(range(len(labels)))
    order = sorted(range(len(done)), key=lambda i: values[i], reverse=direction == "minimize")
    for i in order:  # best drawn last, on top
        ys = [col[i] for col in columns]
        ax.plot(xs, ys, color=cmap(norm(values[i])), alpha=0.8, linewidth=1.2)
    for x, (tick_pos, tick_labels) in zip(xs, ticks, strict=True):
        ax.axvline(x, color="black", linewidth=0.8)
        for p, text in zip(tick_pos, tick_labels, strict=True):
            ax.text(x + 0.03, p, text, fontsize=7, va="center")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(labels) - 0.6)
    ax.set_title(f"{title}: parallel coordinates ({len(done)} finished trials)")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="objective")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_search(
    state: SearchState, direction: str, out_dir: str | Path, title: str, space: Space | None
) -> list[Path]:
    """Both plots into ``out_dir``: ``best_so_far.png`` and ``parallel_coordinates.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_best_so_far(state, direction, out / "best_so_far.png", title),
        plot_parallel_coordinates(state, direction, out / "parallel_coordinates.png", title, space),
    ]
