"""Checkpoint stall (async vs sync) and parallel sharded save throughput vs raw writes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ckpt.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ckpt.py --mb 512 --repeats 3 --json

1. **Stall per checkpoint**: the built-in trainer (one process, Adam, an MLP whose weights and
   optimizer state make ``--mb`` MB) saves ``--repeats`` checkpoints into a repository under
   ``--dir``, synchronously and with ``async_checkpoint``; the stall is how long ``save()``
   blocked the step loop (``Trainer.checkpoint_stalls``). The async save's write continues
   in the background (here awaited after each save, outside the stall, as if training
   steps ran meanwhile).
2. **Sharded save throughput**: 1, 2 and 4 processes each write their 1/N piece of ``--mb`` MB
   at the same time with ``ModelRepository.save_shard`` (start on a barrier), then one
   commits: MB/s from the barrier to the commit. Against it, the raw write bandwidth of the
   same directory: N processes each ``write`` + ``fsync`` the same number of bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset


def _task(mb: float) -> Any:
    from aimass_hpc.runtime.task import TrainTask

    # Adam: weights + 2 moments = 3x the parameters; width w, 4 layers of w*w floats.
    width = int(((mb * 2**20 / 4 / 3) / 4) ** 0.5)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    data = TensorDataset(torch.randn(64, width), torch.randn(64, width))
    return TrainTask(model=model, train=data, loss=nn.functional.mse_loss), width


def stall(root: Path, mb: float, repeats: int, asynchronous: bool) -> dict[str, Any]:
    """Mean/max seconds the loop blocked per checkpoint, and the whole save's duration."""
    from aimass_hpc.runtime.checkpoint import RepositoryStore
    from aimass_hpc.runtime.config import TrainParams
    from aimass_hpc.runtime.trainer import Trainer

    task, width = _task(mb)
    params = TrainParams(optimizer="adam", batch_size=32, steps=1, async_checkpoint=asynchronous)
    run = root / f"run-{'async' if asynchronous else 'sync'}"
    run.mkdir()
    store = RepositoryStore(root / "repo", "bench", run)
    trainer = Trainer(task, params, store=store)
    x, y = task.train.tensors
    trainer.task.loss(trainer.model(x[:32]), y[:32]).backward()
    trainer.optimizer.step()  # Adam state exists: a realistic checkpoint
    started = time.perf_counter()
    for _ in range(repeats):
        trainer.save()
        trainer.step += 1
        # Training would run here while the write goes on; wait outside the stall.
        trainer._finish_pending()
    total = time.perf_counter() - started
    stalls = trainer.checkpoint_stalls
    return {
        "mode": "async" if asynchronous else "sync",
        "width": width,
        "stall_mean_s": sum(stalls) / len(stalls),
        "stall_max_s": max(stalls),
        "total_s": total,
    }


def _writer(args: tuple[str, int, int, int, Any, str]) -> None:
    root, rank, world, nbytes, barrier, mode = args
    piece = torch.ones(nbytes // 4, dtype=torch.float32)
    barrier.wait()
    if mode == "raw":
        with open(Path(root) / f"raw-{rank}", "wb") as fh:
            fh.write(piece.numpy().tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        return
    from aimass_hpc.repo import ModelRepository

    ModelRepository(root).save_shard(
        "bench",
        {"w": piece},
        key=f"k{world}",
        rank=rank,
        world_size=world,
        layout={"model/w": {"global_shape": [world * piece.numel()], "offsets": [0]}},
    )


def throughput(root: Path, mb: float, world: int, mode: str) -> float:
    """MB/s of ``world`` processes writing ``mb`` MB together (sharded save or raw)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(world + 1)
    nbytes = int(mb * 2**20 / world) // 4 * 4
    procs = [
        ctx.Process(target=_writer, args=((str(root), r, world, nbytes, barrier, mode),))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    started = time.perf_counter()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    if mode == "sharded":
        from aimass_hpc.repo import ModelRepository

        # The layout above overlaps (every piece at offset 0): fine for timing, never loaded.
        ModelRepository(root).commit_shards("bench", f"k{world}", world_size=world)
    return mb / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=192.0, help="checkpoint size (MB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        stalls = []
        for asynchronous in (False, True):
            sub = base / f"stall-{asynchronous}"
            sub.mkdir()
            stalls.append(stall(sub, args.mb, args.repeats, asynchronous))
        rates = []
        for world in (1, 2, 4):
            row = {"writers": world}
            for mode in ("sharded", "raw"):
                sub = base / f"tp-{mode}-{world}"
                sub.mkdir()
                row[f"{mode}_mb_s"] = throughput(sub, args.mb, world, mode)
            rates.append(row)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps({"mb": args.mb, "stall": stalls, "throughput": rates}, indent=2))
        return
    print(f"checkpoint {args.mb:.0f} MB (weights + Adam state), {args.repeats} saves")
    print("| mode | stall mean | stall max | all saves done |")
    print("| --- | ---: | ---: | ---: |")
    for s in stalls:
        print(
            f"| {s['mode']} | {s['stall_mean_s']:.3f} s | {s['stall_max_s']:.3f} s "
            f"| {s['total_s']:.2f} s |"
        )
    ratio = stalls[1]["stall_mean_s"] / max(stalls[0]["stall_mean_s"], 1e-9)
    print(f"async stall = {100 * ratio:.1f}% of the synchronous save\n")
    print("| writers | sharded save | raw write + fsync | sharded / raw |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rates:
        print(
            f"| {r['writers']} | {r['sharded_mb_s']:.0f} MB/s | {r['raw_mb_s']:.0f} MB/s "
            f"| {r['sharded_mb_s'] / r['raw_mb_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
