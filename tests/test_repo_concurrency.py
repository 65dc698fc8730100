"""Many writers, one model: version numbers are allocated without locks and never collide."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np

from aimass_hpc.repo import ModelRepository

WRITERS = 8
SAVES = 20
FORK = mp.get_context("fork")


def _writer(root: str, writer: int, start, errors) -> None:  # noqa: ANN001
    repo = ModelRepository(root)
    start.wait()
    try:
        for i in range(SAVES):
            seed = writer * 1000 + i
            w = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
            repo.save("shared", {"w": w}, description=str(seed), alignment=4096)
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"writer {writer}: {exc!r}")


def test_eight_processes_save_twenty_versions_each(tmp_path: Path) -> None:
    root = ModelRepository(tmp_path / "repo").root
    start = FORK.Event()
    errors = FORK.Queue()
    procs = [
        FORK.Process(target=_writer, args=(str(root), k, start, errors)) for k in range(WRITERS)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=300)
    assert errors.empty(), errors.get()
    assert [p.exitcode for p in procs] == [0] * WRITERS

    repo = ModelRepository(root, create=False)
    versions = repo.versions("shared")
    assert [v.number for v in versions] == list(range(1, WRITERS * SAVES + 1))
    seeds = sorted(int(v.description) for v in versions)
    assert seeds == sorted(k * 1000 + i for k in range(WRITERS) for i in range(SAVES))
    for v in versions:
        assert repo.verify(v.ref).ok
        seed = int(v.description)
        expect = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
        assert np.array_equal(repo.load(v.ref).state_dict["w"].numpy(), expect), v.ref
    assert repo.gc(grace_seconds=0).removed == []  # nobody left anything behind


def _open_repo(path: str) -> None:
    from aimass_hpc.repo import ModelRepository

    ModelRepository(path)


def test_many_processes_create_one_new_repository_at_once(tmp_path):
    import multiprocessing as mp

    root = tmp_path / "fresh-repo"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_open_repo, args=(str(root),)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
