"""Script mode with ``backend = "fsdp"``: the documented script (optimizer built before
``job.wrap``) on 2 local Gloo ranks, interrupted and resumed, and its sharded final model
served through the serving loader (``ModelRepository.load`` + the recipe)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from test_script_mode_local import MODEL_PY, TRAIN_PY, _result, _run

from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime.config import RunConfig
from aimass_hpc.serve.model_loader import load_from_repository


def _setup(tmp: Path, name: str) -> Path:
    (tmp / "tinymodel.py").write_text(MODEL_PY)
    (tmp / "train.py").write_text(TRAIN_PY)
    run_dir = tmp / name
    run_dir.mkdir()
    cfg = RunConfig(
        run_dir=str(run_dir),
        backend="fsdp",
        script=str(tmp / "train.py"),
        model_name=name,
        repository=str(tmp / "repo"),
    )
    (run_dir / "train.json").write_text(json.dumps(cfg.to_dict()))
    return run_dir


def test_fsdp_script_resumes_bit_for_bit_and_serves_unsharded(tmp_path: Path) -> None:
    port = 29400 + os.getpid() % 200
    script = str(tmp_path / "train.py")
    whole = _setup(tmp_path, "whole")
    assert [c for c, _ in _run(whole, script, 2, port)] == [0, 0]
    cut = _setup(tmp_path, "cut")
    first = _run(cut, script, 2, port + 1, STOP_AT="10")
    assert [c for c, _ in first] == [0, 0], first
    assert _result(cut)["status"] == "stopped"
    assert [c for c, _ in _run(cut, script, 2, port + 2)] == [0, 0]
    repo = ModelRepository(tmp_path / "repo")
    a = repo.load(_result(whole)["final_ref"])
    b = repo.load(_result(cut)["final_ref"])
    assert a.version.kind == "sharded"
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    # The sharded final model loads whole and serves: the rebuilt module computes exactly
    # what a plain module with those weights does.
    served = load_from_repository(tmp_path / "repo", _result(whole)["final_ref"], device="cpu")
    x = torch.randn(5, 4)
    plain = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
    )
    plain.load_state_dict(dict(a.state_dict))
    plain.eval()
    assert torch.equal(served.module(x), plain(x))
