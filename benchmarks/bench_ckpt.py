"""Checkpoint stall (async vs sync) and parallel sharded save throughput vs raw writes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ckpt.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ckpt.py --mb 512 --repeats 7 --json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ckpt.py --no-throughput

1. **Stall per checkpoint**: two built-in trainers (one process, Adam, an MLP whose weights
   and optimizer state make ``--mb`` MB), one saving synchronously and one with
   ``async_checkpoint``, save in turn into a repository under ``--dir``: one warm-up each,
   then ``--repeats`` each. The stall is how long ``save()`` blocked the step loop
   (``Trainer.checkpoint_stalls``). The async save's write continues in the background (here
   awaited after each save, outside the stall, as if training steps ran meanwhile).
   Reported: the model size, the median and max over the measured saves, and the ratio of
   the medians against the target (async <= 10% of sync).
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
import statistics
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


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _trainer(root: Path, mb: float, asynchronous: bool) -> Any:
    from aimass_hpc.runtime.checkpoint import RepositoryStore
    from aimass_hpc.runtime.config import TrainParams
    from aimass_hpc.runtime.trainer import Trainer

    task, width = _task(mb)
    params = TrainParams(optimizer="adam", batch_size=32, steps=1, async_checkpoint=asynchronous)
    run = root / f"run-{'async' if asynchronous else 'sync'}"
    run.mkdir()
    trainer = Trainer(task, params, store=RepositoryStore(root / "repo", "bench", run))
    x, y = task.train.tensors
    trainer.task.loss(trainer.model(x[:32]), y[:32]).backward()
    trainer.optimizer.step()  # Adam state exists: a realistic checkpoint
    return trainer, width


def stall(root: Path, mb: float, repeats: int) -> list[dict[str, Any]]:
    """Seconds the step loop blocked per checkpoint (median, max), sync and async.

    The two trainers save in turn (sync, async, sync, ...) so that both meet the same
    page-cache and disk state: a synchronous save's duration varies a lot with the kernel's
    writeback, and back-to-back runs of each mode would compare different conditions. The
    first save of each is a warm-up (first-touch allocations) and is reported apart; the
    median is over the ``repeats`` saves after it.
    """
    runs = [_trainer(root, mb, asynchronous) for asynchronous in (False, True)]
    done: list[list[float]] = [[], []]  # snapshot + write + commit of each save
    for _ in range(repeats + 1):
        for i, (trainer, _) in enumerate(runs):
            started = time.perf_counter()
            trainer.save()
            trainer.step += 1
            # Training would run here while the write goes on; wait outside the stall.
            trainer._finish_pending()
            done[i].append(time.perf_counter() - started)
    rows = []
    for i, (trainer, width) in enumerate(runs):
        tensors = [*trainer.model.state_dict().values(), *_tensors(trainer.optimizer.state_dict())]
        stalls = trainer.checkpoint_stalls
        rows.append(
            {
                "mode": "async" if i else "sync",
                "width": width,
                "parameters": sum(p.numel() for p in trainer.model.parameters()),
                "checkpoint_bytes": sum(t.numel() * t.element_size() for t in tensors),
                "first_stall_s": stalls[0],
                "stall_median_s": _median(stalls[1:]),
                "stall_max_s": max(stalls[1:]),
                "stalls_s": stalls[1:],
                "save_done_median_s": _median(done[i][1:]),
            }
        )
    return rows


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


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


TARGET = 0.10  # issue 15: async stall <= 10% of the synchronous save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=192.0, help="checkpoint size (MB)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="saves measured per mode (after one warm-up)"
    )
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--no-throughput", action="store_true", help="only the stall table (skip part 2)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    base = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        stalls = stall(base, args.mb, args.repeats)
        rates: list[dict[str, float]] = []
        for world in () if args.no_throughput else (1, 2, 4):
            row: dict[str, float] = {"writers": world}
            for mode in ("sharded", "raw"):
                sub = base / f"tp-{mode}-{world}"
                sub.mkdir()
                row[f"{mode}_mb_s"] = throughput(sub, args.mb, world, mode)
            rates.append(row)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = stalls[1]["stall_median_s"] / max(stalls[0]["stall_median_s"], 1e-9)
    if args.json:
        print(
            json.dumps(
                {
                    "mb": args.mb,
                    "repeats": args.repeats,
                    "stall": stalls,
                    "async_over_sync": ratio,
                    "target": TARGET,
                    "throughput": rates,
                },
                indent=2,
            )
        )
        return
    s0 = stalls[0]
    print(
        f"model: MLP 4 x Linear({s0['width']}, {s0['width']}), {s0['parameters'] / 1e6:.1f} M "
        f"fp32 parameters; checkpoint (weights + Adam moments) "
        f"{s0['checkpoint_bytes'] / 2**20:.0f} MB; one process, "
        f"torch threads {torch.get_num_threads()}; median of {args.repeats} saves "
        "after 1 warm-up"
    )
    print("| mode | stall median | stall max | warm-up stall | save done (median) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in stalls:
        print(
            f"| {s['mode']} | {s['stall_median_s']:.3f} s | {s['stall_max_s']:.3f} s "
            f"| {s['first_stall_s']:.3f} s | {s['save_done_median_s']:.3f} s |"
        )
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(
        f"async stall / sync save (medians) = {100 * ratio:.1f}% "
        f"(target <= {100 * TARGET:.0f}%: {verdict})\n"
    )
    if not rates:
        return
    print("| writers | sharded save | raw write + fsync | sharded / raw |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rates:
        print(
            f"| {r['writers']} | {r['sharded_mb_s']:.0f} MB/s | {r['raw_mb_s']:.0f} MB/s "
            f"| {r['sharded_mb_s'] / r['raw_mb_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
