"""Compressed exports: size and accuracy delta of bf16, fp16, int8 and ONNX against fp32.

    .venv/bin/python benchmarks/bench_export.py
    .venv/bin/python benchmarks/bench_export.py --samples 16 --json

Saves a small MLP and a small conv net (``aimass_hpc.serve.toymodels`` recipes, seeded
random weights) in a temporary repository, then for each compression reports the weights'
size (tensor bytes; for ONNX the file) and the max/mean absolute output difference from the
fp32 original on ``--samples`` random batches of 8 drawn from the recipe's input shape. The
compressed modules are rebuilt from the compressed state dict and recipe, as serving does,
and the export time is wall-clock on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aimass_hpc.repo import ModelRepository, compress
from aimass_hpc.serve import toymodels

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp 256-512x3-10": (
        "mlp",
        {"in_features": 256, "hidden": 512, "out_features": 10, "depth": 3},
    ),
    "cnn 3x32x32 w32": ("cnn", {"channels": 3, "size": 32, "classes": 10, "width": 32}),
}
KINDS: list[tuple[str, dict[str, Any]]] = [
    ("bf16", {"dtype": "bf16"}),
    ("fp16", {"dtype": "fp16"}),
    ("int8 (dynamic)", {"quantize": "int8"}),
    ("int8 (weight-only)", {"quantize": "int8-weight-only"}),
]


def run(samples: int) -> list[dict[str, Any]]:
    """One row per model and export kind (fp32 first)."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = ModelRepository(Path(tmp) / "repo")
        for label, (factory, kwargs) in MODELS.items():
            torch.manual_seed(0)
            module = getattr(toymodels, factory)(**kwargs)
            recipe = toymodels.recipe(f"aimass_hpc.serve.toymodels:{factory}", **kwargs)
            v = repo.save(factory, module.state_dict(), recipe=recipe)
            ckpt = repo.load(v.ref)
            fp32 = compress.tensor_bytes(ckpt.state_dict)
            rows.append(_row(label, "fp32 (original)", fp32, fp32, 0.0, 0.0, 0.0))
            for kind, opts in KINDS:
                t0 = time.perf_counter()
                res = compress.compress(ckpt, samples=samples, **opts)
                dt = time.perf_counter() - t0
                d = res.delta
                rows.append(
                    _row(label, kind, res.size_bytes, fp32, d["max_abs"], d["mean_abs"], dt)
                )
            t0 = time.perf_counter()
            onnx = compress.export_onnx(ckpt, Path(tmp) / f"{factory}.onnx", samples=samples)
            dt = time.perf_counter() - t0
            rows.append(
                _row(
                    label,
                    "onnx (fp32)",
                    onnx.size_bytes,
                    fp32,
                    onnx.max_abs_diff,
                    onnx.mean_abs_diff,
                    dt,
                )
            )
    return rows


def _row(
    model: str, kind: str, size: int, fp32: int, max_abs: float, mean_abs: float, seconds: float
) -> dict[str, Any]:
    return {
        "model": model,
        "export": kind,
        "size_bytes": size,
        "size_vs_fp32": size / fp32,
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8, help="random batches of 8 per model")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    rows = run(args.samples)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"compressed exports ({args.samples} random batches of 8)")
    for col in ("model", "export", "size", "vs fp32", "max |diff|", "mean |diff|", "time"):
        table.add_column(col, justify="left" if col in ("model", "export") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["export"],
            f"{r['size_bytes'] / 1024:.1f} KiB",
            f"{r['size_vs_fp32']:.2f}",
            f"{r['max_abs_diff']:.2e}",
            f"{r['mean_abs_diff']:.2e}",
            f"{r['seconds']:.2f} s",
        )
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    main()
