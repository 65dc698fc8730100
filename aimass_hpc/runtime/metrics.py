"""Training metrics as JSON lines in ``<run_dir>/metrics.jsonl`` (written by rank 0).

Records carry ``kind``: ``"step"`` (loss, samples/s, lr), ``"epoch"`` (validation metrics),
``"event"`` (start, resume, checkpoint, preempt, done). Step records are buffered and written
in one ``append_line`` (one write + fsync) every ``flush_every`` records or ``flush_seconds``
(checked when a record arrives), so logging every step does not cost an fsync per step.

After a restart, steps between the last checkpoint and the interruption are trained (and
logged) again; :func:`read_metrics` drops the superseded records so curves stay clean.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aimass_hpc.common import fsutil

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors and numpy numbers become floats, NaN becomes null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Buffered JSON-lines writer; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        enabled: bool = True,
        flush_every: int = 1000,
        flush_seconds: float = 10.0,
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE if run_dir is not None else None
        self.enabled = enabled and self.path is not None
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def log(self, kind: str, /, **fields: Any) -> None:
        """Queue a record of ``kind``; events and epochs are flushed at once."""
        if not self.enabled:
            return
        record = {"kind": kind, "time": round(time.time(), 3)}
        record.update(fields)
        self._pending.append(record)
        if (
            kind != "step"
            or len(self._pending) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write every queued record with one append (one fsync)."""
        if not self.enabled or not self._pending:
            return
        lines = []
        for rec in self._pending:
            lines.append(json.dumps({k: _clean(v) for k, v in rec.items()}, sort_keys=False))
        fsutil.append_line(self.path, "\n".join(lines))  # type: ignore[arg-type]
        self._pending.clear()
        self._last_flush = time.monotonic()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of a run in order, minus those a later ``resume`` event superseded.

    A ``resume`` event at step ``s`` means the job restarted from the checkpoint at ``s``:
    every earlier step/epoch record with ``step > s`` was retrained and is dropped.
    """
    records = fsutil.read_json_lines(Path(run_dir) / METRICS_FILE)
    out: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("kind") == "event" and rec.get("event") == "resume":
            resumed_at = int(rec.get("step", 0))
            out = [
                r for r in out if r.get("kind") == "event" or int(r.get("step", 0)) <= resumed_at
            ]
        out.append(rec)
    return out


def series(records: list[Mapping[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the records of ``kind`` (missing values skipped)."""
    xs: list[int] = []
    ys: list[float] = []
    for rec in records:
        if rec.get("kind") == kind and rec.get(key) is not None:
            xs.append(int(rec.get("step", 0)))
            ys.append(float(rec[key]))
    return xs, ys


def summarize(run_dir: str | Path) -> dict[str, Any] | None:
    """A one-glance view of a run's progress for ``aimass status``/``logs`` (no torch import).

    ``{"step", "total_steps", "loss", "samples_per_s", "epoch", "metrics", "event"}`` from the
    newest records, or None when the run has logged nothing yet.
    """
    records = read_metrics(run_dir)
    if not records:
        return None
    out: dict[str, Any] = {"step": 0, "total_steps": None, "metrics": {}, "event": None}
    for rec in records:
        kind = rec.get("kind")
        if kind == "step":
            out.update(
                step=rec.get("step"),
                loss=rec.get("loss"),
                samples_per_s=rec.get("samples_per_s"),
                epoch=rec.get("epoch"),
            )
        elif kind == "epoch":
            out["metrics"] = {k: v for k, v in rec.items() if k not in ("kind", "time", "step")}
        elif kind == "event":
            out["event"] = rec.get("event")
            if rec.get("total_steps"):
                out["total_steps"] = rec["total_steps"]
    return out
