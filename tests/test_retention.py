"""Checkpoint retention: a run keeps its newest N checkpoints, every final model, every aliased
version and the checkpoint it would resume from; a kill mid-prune leaves a usable repository."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo import repository as repository_module
from aimass_hpc.runtime.api import make_store
from aimass_hpc.runtime.checkpoint import (
    INDEX_FILE,
    MemoryStore,
    RepositoryStore,
    SaveInfo,
    TrainState,
)
from aimass_hpc.runtime.config import RunConfig, TrainParams
from aimass_hpc.runtime.task import TrainTask
from aimass_hpc.runtime.trainer import Trainer

FORK = mp.get_context("fork")


def state(step: int) -> TrainState:
    return TrainState(
        model={"w": torch.full((4,), float(step))},
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        extra={"step": step},
    )


def checkpoint(store: RepositoryStore, step: int) -> str:
    return store.save(state(step), SaveInfo(kind="checkpoint", run={"step": step}))


def numbers(repo_dir: Path, name: str = "m") -> list[int]:
    return ModelRepository(repo_dir).version_numbers(name)


def test_keeps_the_newest_n_checkpoints_and_the_final(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = RepositoryStore(tmp_path / "repo", "m", run, keep=2)
    for step in range(1, 7):
        checkpoint(store, step)
        assert len(numbers(tmp_path / "repo")) == min(step, 2)
    final = store.save(TrainState(model={"w": torch.ones(4)}), SaveInfo(kind="final"))
    checkpoint(store, 7)  # checkpoints after a final (a resumed run) never take the final
    assert numbers(tmp_path / "repo") == [6, 7, 8]
    assert final == "m:7"
    latest = store.latest()
    assert latest is not None and latest.step == 7  # the resume point is always there
    lines = [json.loads(x) for x in (run / INDEX_FILE).read_text().splitlines()]
    assert sorted(e["ref"] for e in lines if e["kind"] == "pruned") == [
        f"m:{n}" for n in range(1, 6)
    ]
    assert store.pruned() == {f"m:{n}" for n in range(1, 6)}
    assert all(e["kind"] != "pruned" for e in store.history())


def test_never_deletes_aliased_versions_or_other_runs(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = RepositoryStore(repo_dir, "m", tmp_path / "a", keep=1)
    b = RepositoryStore(repo_dir, "m", tmp_path / "b")  # keep None: keeps all
    first = checkpoint(a, 1)
    ModelRepository(repo_dir).promote("m", first, "best")
    other = checkpoint(b, 1)
    for step in range(2, 5):
        checkpoint(a, step)
    repo = ModelRepository(repo_dir)
    kept = [v.ref for v in repo.versions("m")]
    assert first in kept and other in kept  # aliased; another run's
    assert kept == [first, other, "m:5"]  # a's steps 2 and 3 went, its newest stayed
    # A damaged alias file: we cannot tell what it points at, so nothing is deleted.
    (repo_dir / "models" / "m" / "aliases" / "prod.json").write_text("{", encoding="utf-8")
    checkpoint(a, 5)
    assert "m:5" in [v.ref for v in ModelRepository(repo_dir).versions("m")]


def test_keep_comes_from_the_run_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = RunConfig(
        run_dir=str(run), repository=str(tmp_path / "repo"), model_name="m", keep_checkpoints=3
    )
    store = make_store(config)
    assert isinstance(store, RepositoryStore) and store.keep == 3
    assert RepositoryStore(tmp_path / "repo", "m", run).keep is None  # no limit given
    assert RepositoryStore(tmp_path / "repo", "m", run, keep=1).keep == 1
    assert RepositoryStore(tmp_path / "repo", "m", None).keep is None
    with pytest.raises(ValueError, match="keep_checkpoints must be a positive integer"):
        MemoryStore(keep=0)
    mem = MemoryStore(keep=1)
    for step in range(3):
        mem.save(state(step), SaveInfo(kind="checkpoint"))
    assert list(mem.saved) == ["memory:3"]


def test_trainer_with_checkpoint_every_step_keeps_two_and_the_final(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = RepositoryStore(tmp_path / "repo", "m", run, keep=2)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    task = TrainTask(model=nn.Linear(4, 2), train=(x, (x[:, 0] > 0).long()),
                     loss=nn.CrossEntropyLoss())  # fmt: skip
    result = Trainer(task, TrainParams(batch_size=4, steps=10, checkpoint_every=1),
                     store=store).fit()  # fmt: skip
    repo = ModelRepository(tmp_path / "repo")
    kinds = [(v.ref, v.kind) for v in repo.versions("m")]
    assert [k for _, k in kinds] == ["checkpoint", "checkpoint", "model"]
    assert kinds[-1][0] == result.final_ref and kinds[1][0] == result.checkpoint_ref


# ------------------------------------------------------------------- a kill mid-prune


def _pruner(root: str, run: str, die_at: str, ready) -> None:  # noqa: ANN001
    store = RepositoryStore(root, "m", run, keep=1)
    calls = {"n": 0}

    def hook(stage: str) -> None:
        if stage == die_at:
            calls["n"] += 1
            if calls["n"] == 3:  # in the middle of deleting several versions
                os.kill(os.getpid(), signal.SIGKILL)

    repository_module.STAGE_HOOK = hook
    ready.send(b"1")
    checkpoint(store, 99)  # the save that triggers pruning


@pytest.mark.parametrize("die_at", ["delete-unpublished", "delete-unlinked"])
def test_a_kill_during_pruning_leaves_a_loadable_repository(tmp_path: Path, die_at: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    root = tmp_path / "repo"
    store = RepositoryStore(root, "m", run)  # keep all while we build history
    for step in range(1, 8):
        checkpoint(store, step)
    store.save(TrainState(model={"w": torch.ones(4)}), SaveInfo(kind="final"))
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_pruner, args=(str(root), str(run), die_at, child))
    proc.start()
    parent.recv()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    repo = ModelRepository(root)
    listed = repo.versions("m")
    assert 1 < len(listed) < 9  # some deleted, some not: killed mid-way
    for v in listed:
        assert repo.verify(v.ref).ok, v.ref
        repo.load(v.ref)
    assert repo.get("m:8").kind == "model"  # the final model is untouched
    assert "m:9" in [v.ref for v in listed]  # the new checkpoint committed before the prune
    # The run resumes from its newest checkpoint, and the next prune finishes the job.
    again = RepositoryStore(root, "m", run, keep=1)
    latest = again.latest()
    assert latest is not None and latest.step == 99
    again.prune()
    assert repo.version_numbers("m") == [8, 9]
    report = repo.gc(grace_seconds=0)
    assert not [p for p in report.removed if p.endswith(".h5")]  # only leftovers went
    assert repo.version_numbers("m") == [8, 9]


def test_keep_checkpoints_from_the_site_or_the_spec(tmp_path: Path) -> None:
    from _sitefixtures import write_site

    from aimass_hpc.config.train_spec import load_train_spec, plan_training

    dev_site = write_site(tmp_path, "dev")
    digits = Path(__file__).resolve().parents[1] / "examples" / "digits" / "spec.toml"
    plan = plan_training(load_train_spec(digits), dev_site)
    assert plan.config.keep_checkpoints == dev_site.training.keep_checkpoints == 5
    assert "keep_checkpoints" not in plan.config.train.__dict__  # not a hyperparameter
    plan = plan_training(load_train_spec(digits, {"train.keep_checkpoints": 2}), dev_site)
    assert plan.config.keep_checkpoints == 2
    assert json.loads(plan.files()["train.json"])["keep_checkpoints"] == 2
