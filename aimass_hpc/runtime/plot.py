"""Training curves to a PNG (``aimass plot RUN``): step loss and throughput, epoch metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aimass_hpc.runtime.metrics import series

_NOT_METRICS = {"kind", "time", "step", "epoch", "event"}


def plot_metrics(
    records: Sequence[Mapping[str, Any]], output: str | Path, *, title: str = ""
) -> Path:
    """Draw loss / samples-per-second / epoch metrics of ``records`` into ``output``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on login nodes
    import matplotlib.pyplot as plt

    epoch_keys = sorted(
        {k for r in records if r.get("kind") == "epoch" for k in r if k not in _NOT_METRICS}
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss, ax_speed, ax_epoch = axes
    xs, ys = series(list(records), "step", "loss")
    ax_loss.plot(xs, ys, lw=0.8, label="step loss")
    for key in ("train_loss", "val_loss"):
        ex, ey = series(list(records), "epoch", key)
        if ex:
            ax_loss.plot(ex, ey, marker="o", label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    sx, sy = series(list(records), "step", "samples_per_s")
    ax_speed.plot(sx, sy, lw=0.8)
    ax_speed.set(xlabel="step", ylabel="samples/s", title="throughput")
    for key in epoch_keys:
        if key.endswith("loss"):
            continue
        ex, ey = series(list(records), "epoch", key)
        ax_epoch.plot(ex, ey, marker="o", label=key)
    ax_epoch.set(xlabel="step", title="epoch metrics")
    if ax_epoch.lines:
        ax_epoch.legend()
    for r in records:
        if r.get("kind") == "event" and r.get("event") == "resume":
            for ax in axes:
                ax.axvline(int(r.get("step", 0)), color="grey", ls=":", lw=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(output)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
