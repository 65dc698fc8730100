"""Crash safety: a writer SIGKILLed at any point of a save never leaves a half-visible version.

Children are forked (cheap: no interpreter start) and save small checkpoints with numpy data,
so the whole module runs in seconds. Each kill is followed by a full consistency check.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo import repository as repository_module

STAGES = [
    "claimed",
    "layout-written",
    "data-written",
    "file-synced",
    "sidecar-written",
    "renamed",
    "committed",
]
ALIGN = 4096  # small files; tensors >= 64 KiB still get their own aligned dataset
FORK = mp.get_context("fork")


def checkpoint(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    sd = {f"small.{i}": rng.standard_normal(i + 1).astype(np.float32) for i in range(20)}
    sd["big"] = rng.standard_normal(40_000).astype(np.float32)  # 160 KB: its own dataset
    extra = {"seed": seed, "rng": np.random.RandomState(seed).get_state()}
    return sd, extra


def save(repo: ModelRepository, seed: int):  # noqa: ANN201
    sd, extra = checkpoint(seed)
    return repo.save("m", sd, extra=extra, description=str(seed), alignment=ALIGN)


def _child(root: str, die_at: str | None, first_seed: int, ready) -> None:  # noqa: ANN001
    if die_at is not None:

        def hook(stage: str) -> None:
            if stage == die_at:
                os.kill(os.getpid(), signal.SIGKILL)

        repository_module.STAGE_HOOK = hook
    repo = ModelRepository(root)
    ready.send(b"1")
    seed = first_seed
    while True:
        save(repo, seed)
        seed += 1


def run_child(
    root: Path,
    *,
    die_at: str | None = None,
    kill_after: float | None = None,
    first_seed: int = 1000,
) -> int:
    parent_end, child_end = FORK.Pipe()
    proc = FORK.Process(target=_child, args=(str(root), die_at, first_seed, child_end))
    proc.start()
    parent_end.recv()
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    return proc.pid


def check_consistent(root: Path, known: dict[int, int]) -> dict[int, int]:
    """The repository opens; every listed version is complete; nothing committed vanished."""
    repo = ModelRepository(root, create=False)
    versions = repo.versions("m")
    listed = {v.number: int(v.description) for v in versions}
    assert set(known) <= set(listed), "a committed version disappeared"
    for number, seed in listed.items():
        if number in known and number != max(known):
            continue  # checked before; the newest old one is re-loaded below
        v = repo.get(f"m:{number}")
        assert v.file_size == v.path.stat().st_size
        ckpt = repo.load(v.ref)  # verifies every checksum
        sd, extra = checkpoint(seed)
        for key, arr in sd.items():
            assert np.array_equal(ckpt.state_dict[key].numpy(), arr), (number, key)
        assert ckpt.extra["seed"] == seed
    for p in (root / "models" / "m" / "versions").iterdir():
        assert not p.name.startswith(".") or ".tmp" in p.name or ".deleted" in p.name
    return listed


@pytest.fixture
def root(tmp_path: Path) -> Path:
    repo = ModelRepository(tmp_path / "repo")
    save(repo, 1)
    return repo.root


@pytest.mark.parametrize("stage", STAGES)
def test_kill_at_each_stage_of_a_save(root: Path, stage: str) -> None:
    run_child(root, die_at=stage)
    listed = check_consistent(root, {1: 1})
    committed = STAGES.index(stage) >= STAGES.index("renamed")
    assert sorted(listed) == ([1, 2] if committed else [1])
    repo = ModelRepository(root)
    report = repo.gc(grace_seconds=3600)  # the writer is dead (same host): collect now
    assert report.kept_in_progress == []
    leftovers = [p.name for p in (root / "models/m/versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert save(repo, 7).number == 3  # number 2 stays taken even if it never committed


def test_fifty_random_kills_during_saves(root: Path) -> None:
    repo = ModelRepository(root)
    start = time.perf_counter()
    for seed in range(2, 5):
        save(repo, seed)
    per_save = (time.perf_counter() - start) / 3
    known = check_consistent(root, {})
    rnd = random.Random(1234)
    scale, since_commit = 3.0, 0
    for i in range(50):
        before = len(known)
        run_child(root, kill_after=rnd.uniform(0, scale * per_save), first_seed=10_000 * (i + 1))
        known = check_consistent(root, known)
        since_commit = 0 if len(known) > before else since_commit + 1
        if since_commit >= 10:  # the machine got slower than measured: kill later
            scale, since_commit = scale * 2, 0
    report = repo.gc(grace_seconds=3600)
    assert report.removed, "no kill landed inside a save"
    assert check_consistent(root, known) == known
    assert len(known) > 4, "no kill let a save complete first"
