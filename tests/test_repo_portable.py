"""Export to safetensors / torch / compressed HDF5 and import back."""

from __future__ import annotations

import random
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aimass_hpc.common.errors import ConflictError, InputError
from aimass_hpc.repo import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


@pytest.fixture
def checkpoint() -> tuple[dict, dict, dict]:
    emb = torch.randn(100, 16)
    sd = {
        "embed.weight": emb,
        "head.weight": emb,  # tied
        "ln.bias": torch.zeros(16).to(torch.bfloat16),
        "step": torch.tensor(3),
    }
    opt = {
        "state": {0: {"exp_avg": torch.ones(4), "step": torch.tensor(2.0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}],
    }
    extra = {
        "rng": {
            "numpy": np.random.RandomState(0).get_state(),
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
        },
        "position": 12,
    }
    return sd, opt, extra


def same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)  # safetensors orders by dtype and size
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_safetensors_export_and_import(repo, checkpoint, tmp_path) -> None:
    sd, _, _ = checkpoint
    repo.save("net", sd, metrics={"acc": 0.5}, tags=["x"])
    out = repo.export("net", tmp_path / "net.safetensors")
    same_state(sd, load_file(out))
    with pytest.raises(ConflictError, match="exists"):
        repo.export("net", out)
    repo.export("net", out, overwrite=True)
    v = repo.import_(out, "copy", tags=["imported"])
    assert v.metrics == {"acc": 0.5} and v.tags == ["imported"]
    assert v.run["imported_from"] == str(out)
    same_state(sd, repo.load("copy").state_dict)


def test_torch_export_keeps_optimizer_and_extra(repo, checkpoint, tmp_path) -> None:
    sd, opt, extra = checkpoint
    repo.save("net", sd, optimizer=opt, extra=extra)
    out = repo.export("net", tmp_path / "net.pt", format="torch")
    loaded = torch.load(out, weights_only=False)
    same_state(sd, loaded["state_dict"])
    v = repo.import_(out, "again")
    ckpt = repo.load(v.ref)
    same_state(sd, ckpt.state_dict)
    assert ckpt.optimizer["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(ckpt.optimizer["state"][0]["exp_avg"], torch.ones(4))
    np.random.set_state(ckpt.extra["rng"]["numpy"])
    random.setstate(ckpt.extra["rng"]["python"])
    assert ckpt.extra["position"] == 12


def test_compressed_hdf5_archive_round_trips(repo, tmp_path) -> None:
    sd = {"zeros": torch.zeros(512, 1024), "small": torch.arange(10.0)}
    repo.save("net", sd, extra={"n": 1})
    plain = repo.get("net").metadata["tensor_bytes"]
    out = repo.export("net", tmp_path / "net.h5", format="hdf5", compression="gzip")
    assert out.stat().st_size < plain / 10
    with h5py.File(out, "r") as f:
        assert f["model/zeros"].compression == "gzip"
    v = repo.import_(out, "restored")
    ckpt = repo.load(v.ref)
    same_state(sd, ckpt.state_dict)
    assert ckpt.extra == {"n": 1}
    with pytest.raises(InputError, match="compression applies to the hdf5"):
        repo.export("net", tmp_path / "x.pt", format="torch", compression="gzip")


def test_import_foreign_files(repo, tmp_path) -> None:
    sd = {"w": torch.randn(3, 3), "b": torch.zeros(3, dtype=torch.float16)}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save(
        {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},
        tmp_path / "wrapped.pt",
    )
    save_file(sd, str(tmp_path / "plain.safetensors"))
    for i, name in enumerate(("plain.pt", "wrapped.pt", "plain.safetensors")):
        v = repo.import_(tmp_path / name, "foreign")
        assert v.number == i + 1
        same_state(sd, repo.load(v.ref).state_dict)
    assert repo.load("foreign:2").optimizer == {"state": {}, "param_groups": []}


class Evil:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("pwned",))


def test_import_refuses_unsafe_pickles_and_junk(repo, tmp_path) -> None:
    torch.save({"w": torch.ones(1), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="not a safe torch checkpoint"):
        repo.import_(tmp_path / "evil.pt", "x")
    (tmp_path / "junk.bin").write_bytes(b"hello world" * 10)
    with pytest.raises(InputError, match="cannot import"):
        repo.import_(tmp_path / "junk.bin", "x")
    assert repo.names() == []
