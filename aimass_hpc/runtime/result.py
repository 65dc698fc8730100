"""``report_result``: how any program (no torch needed) hands its result to aimass.

A search trial's command, or a user's own training script, calls this once at the end; the
search driver reads ``<run_dir>/result.json`` before it falls back to the last numeric output
line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aimass_hpc.common import fsutil

RESULT_FILE = "result.json"


def report_result(
    value: float, *, run_dir: str | os.PathLike[str] | None = None, **metrics: Any
) -> Path:
    """Record ``value`` (and named ``metrics``) as this job's result; returns the file written.

    ``run_dir`` defaults to ``$AIMASS_RUN_DIR``, which every aimass job script exports.
    """
    target = run_dir if run_dir is not None else os.environ.get("AIMASS_RUN_DIR")
    if not target:
        raise RuntimeError("report_result: no run_dir given and AIMASS_RUN_DIR is not set")
    path = Path(target) / RESULT_FILE
    fsutil.atomic_write_json(
        path, {"status": "completed", "metrics": {"value": float(value), **metrics}}
    )
    return path
