"""Model repository save/load against torch.save/load, safetensors and raw write bandwidth.

    .venv/bin/python benchmarks/bench_repo.py --size-mb 1024      # the issue's ~1 GiB case
    .venv/bin/python benchmarks/bench_repo.py --size-mb 256 --repeat 3 --dir /lustre/scratch

Builds a state dict of mixed fp32/bf16 tensors of many sizes (64 KiB .. 64 MiB) plus a few
thousand small ones (biases, norms), then times, on the same filesystem:
  save   repo.save | torch.save + fsync | safetensors save_file + fsync | raw write + fsync
  load   repo.load (mapped, checksums verified) | safetensors load_file | torch.load
Every load is followed by touching one byte per page of every tensor, so lazily mapped loads
pay for their page faults. "cold" loads first evict the file from the page cache with
posix_fadvise(DONTNEED) (only that file: harmless on a shared machine). Each number is the
median of --repeat runs. Prints a table of ratios against the issue's targets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from aimass_hpc.repo import ModelRepository

MiB = 1 << 20


def build_state_dict(size_mb: int, small: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """~size_mb MiB of fp32/bf16 tensors of log-uniform sizes, plus ``small`` tiny ones."""
    rng = np.random.default_rng(seed)
    sd: dict[str, torch.Tensor] = {}
    total, i = 0, 0
    budget = size_mb * MiB
    while total < budget:
        nbytes = int(min(2 ** rng.uniform(16, 26), budget - total + 4096))
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        cols = 1024 if nbytes >= 4 * MiB else 256
        rows = max(1, nbytes // (cols * dtype.itemsize))
        sd[f"layers.{i}.weight"] = torch.randn(rows, cols).to(dtype)
        total += sd[f"layers.{i}.weight"].nbytes
        i += 1
    for j in range(small):
        n = int(rng.integers(1, 1024))
        sd[f"blocks.{j}.norm.bias"] = torch.randn(n).to(torch.float32 if j % 3 else torch.bfloat16)
    return sd


def nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in sd.values())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (they are clean after fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touch(sd: dict[str, torch.Tensor]) -> int:
    """Read one byte per 4 KiB page of every tensor (forces mapped pages in)."""
    acc = 0
    for t in sd.values():
        if t.numel():
            flat = t.reshape(-1).view(torch.uint8)
            acc += int(flat[::4096].sum())
    return acc


def raw_write(sd: dict[str, torch.Tensor], path: Path) -> None:
    """The filesystem's sequential write bandwidth: the same bytes, plain write + fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in sd.values():
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


Case = tuple[Callable[[], None] | None, Callable[[], object]]  # (untimed setup, timed work)


def interleaved(cases: dict[str, Case], repeat: int) -> dict[str, float]:
    """Median time of each case; rounds run the cases in turn (a shared machine drifts),
    and a first warm-up round is discarded."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rnd in range(repeat + 1):
        for name, (setup, work) in cases.items():
            if setup:
                setup()
            start = time.perf_counter()
            work()
            elapsed = time.perf_counter() - start
            if rnd:
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def _unlink(*paths: Path) -> Callable[[], None]:
    def clean() -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    return clean


def run(size_mb: int, small: int, repeat: int, workdir: Path) -> tuple[list[tuple], int, int]:
    sd = build_state_dict(size_mb, small)
    total = nbytes(sd)
    smalls = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    repo = ModelRepository(workdir / "repo")
    pt, st, raw = workdir / "sd.pt", workdir / "sd.safetensors", workdir / "raw.bin"
    pt_small = workdir / "small.pt"

    def drop_versions(name: str) -> Callable[[], None]:
        def clean() -> None:
            for v in repo.versions(name) if name in repo.names() else []:
                repo.delete(v.ref)

        return clean

    def torch_save(obj: dict, path: Path) -> None:
        torch.save(obj, path)
        fsync_file(path)

    def st_save() -> None:
        save_file(sd, str(st))
        fsync_file(st)

    save = interleaved(
        {
            "raw": (_unlink(raw), lambda: raw_write(sd, raw)),
            "repo": (drop_versions("bench"), lambda: repo.save("bench", sd)),
            "torch": (_unlink(pt), lambda: torch_save(sd, pt)),
            "safetensors": (_unlink(st), st_save),
            "repo small": (drop_versions("small"), lambda: repo.save("small", smalls)),
            "torch small": (_unlink(pt_small), lambda: torch_save(smalls, pt_small)),
        },
        repeat,
    )
    raw.unlink()
    ours = repo.get("bench").path

    rows = []
    for cache in ("warm", "cold"):

        def evicting(p: Path, c: str = cache) -> Callable[[], None] | None:
            return (lambda: evict(p)) if c == "cold" else None

        load = interleaved(
            {
                "repo": (evicting(ours), lambda: touch(repo.load("bench").state_dict)),
                "repo nv": (
                    evicting(ours),
                    lambda: touch(repo.load("bench", verify=False).state_dict),
                ),
                "safetensors": (evicting(st), lambda: touch(load_file(str(st)))),
                "torch": (evicting(pt), lambda: touch(torch.load(pt, weights_only=True))),
                "torch mmap": (
                    evicting(pt),
                    lambda: touch(torch.load(pt, weights_only=True, mmap=True)),
                ),
            },
            repeat,
        )
        r, st_t = load["repo"], load["safetensors"]
        rows += [
            (f"load {cache}: repo (mapped+verify) vs safetensors", r, st_t, st_t / r, ">= 1.0"),
            (
                f"load {cache}: repo (mapped, no verify) vs safetensors",
                load["repo nv"],
                st_t,
                st_t / load["repo nv"],
                "info",
            ),
            (f"load {cache}: repo vs torch.load", r, load["torch"], load["torch"] / r, "info"),
            (
                f"load {cache}: repo vs torch.load(mmap=True)",
                r,
                load["torch mmap"],
                load["torch mmap"] / r,
                "info",
            ),
        ]
    small_load = interleaved(
        {
            "repo": (None, lambda: touch(repo.load("small").state_dict)),
            "torch": (None, lambda: touch(torch.load(pt_small, weights_only=True))),
        },
        repeat,
    )

    def gbps(t: float) -> float:
        return total / t / 1e9

    t_repo, t_raw = save["repo"], save["raw"]
    rows = [
        (
            f"save: repo vs raw write+fsync ({gbps(t_repo):.2f} vs {gbps(t_raw):.2f} GB/s)",
            t_repo,
            t_raw,
            t_raw / t_repo,
            ">= 0.9",
        ),
        ("save: repo vs torch.save+fsync", t_repo, save["torch"], save["torch"] / t_repo, "> 1.0"),
        (
            "save: repo vs safetensors save_file+fsync",
            t_repo,
            save["safetensors"],
            save["safetensors"] / t_repo,
            "info",
        ),
        *rows,
        (
            f"save {len(smalls)} small tensors: repo vs torch.save",
            save["repo small"],
            save["torch small"],
            save["torch small"] / save["repo small"],
            ">= 1.0",
        ),
        (
            f"load {len(smalls)} small tensors: repo vs torch.load",
            small_load["repo"],
            small_load["torch"],
            small_load["torch"] / small_load["repo"],
            ">= 1.0",
        ),
    ]
    return rows, total, len(sd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="state dict size (default 1024)")
    parser.add_argument("--small", type=int, default=3000, help="number of small tensors")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--dir", type=Path, default=None, help="filesystem to test (default tmp)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="aimass-bench-", dir=args.dir))
    try:
        rows, total, count = run(args.size_mb, args.small, args.repeat, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = Table(
        title=f"model repository: {total / MiB:.0f} MiB in {count} tensors, "
        f"median of {args.repeat}, {workdir.parent}"
    )
    for col in ("comparison", "repo s", "peer s", "ratio (peer/repo)", "target", ""):
        table.add_column(col, justify="left" if col == "comparison" else "right")
    for name, ours, peer, ratio, target in rows:
        if target == "info":
            verdict = ""
        else:
            bound = float(target.split()[-1])
            ok = ratio >= bound if target.startswith(">=") else ratio > bound
            verdict = "[green]ok[/]" if ok else "[red]miss[/]"
        table.add_row(name, f"{ours:.3f}", f"{peer:.3f}", f"{ratio:.2f}x", target, verdict)
    Console().print(table)


if __name__ == "__main__":
    main()
