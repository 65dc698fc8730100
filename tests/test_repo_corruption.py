"""Corruption and truncation are detected and reported naming the tensor; files are plain
HDF5 that Debian's h5ls/h5dump can read."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import pytest
import torch

from aimass_hpc.common.errors import IntegrityError
from aimass_hpc.repo import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


@pytest.fixture
def version(repo):  # noqa: ANN001, ANN201
    sd = {
        "encoder.weight": torch.randn(512, 1024),  # 2 MiB: a dataset of its own
        "encoder.bias": torch.randn(512),  # small: in the packed dataset
        "head.weight": torch.randn(10, 512).to(torch.bfloat16),
    }
    opt = {"state": {0: {"exp_avg": torch.randn(512)}}, "param_groups": [{"lr": 0.1}]}
    return repo.save("net", sd, optimizer=opt)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))


def offset_of(path: Path, tensor: str) -> int:
    with h5py.File(path, "r", locking=False) as f:
        cols = json.loads(bytes(f["aimass/manifest"][()]))  # column-wise
        i = cols["name"].index(tensor)
        at, middle = cols["at"][i], cols["nbytes"][i] // 2
        if isinstance(at, int):  # an offset inside the packed dataset
            return f["aimass/packed"].id.get_offset() + at + middle
        return f[at].id.get_offset() + middle


@pytest.mark.parametrize(
    "tensor", ["model/encoder.weight", "model/encoder.bias", "optimizer/state.0.exp_avg"]
)
def test_flipped_byte_fails_verify_and_load_naming_the_tensor(repo, version, tensor) -> None:
    flip_byte(version.path, offset_of(version.path, tensor))
    report = repo.verify("net")
    assert not report.ok and report.error is None
    assert len(report.failures) == 1
    assert f"tensor '{tensor}': checksum mismatch" in report.failures[0]
    assert tensor in report.message
    with pytest.raises(IntegrityError, match=f"model net:1: tensor '{tensor}': checksum mismatch"):
        repo.load("net")
    repo.load("net", verify=False)  # explicitly unchecked loads still work


def test_truncated_file_is_reported_as_truncated(repo, version) -> None:
    size = version.path.stat().st_size
    os.truncate(version.path, size // 2)
    report = repo.verify("net:1")
    assert not report.ok and "truncated" in report.error
    assert f"{size // 2} of {size} bytes" in report.error
    with pytest.raises(IntegrityError, match="truncated"):
        repo.load("net:1")
    assert repo.get("net:1").param_count > 0  # metadata still readable from the sidecar


def test_truncation_is_caught_even_without_the_sidecar(repo, version) -> None:
    (version.path.parent / "00000001.json").unlink()
    os.truncate(version.path, version.path.stat().st_size - 4096)
    with pytest.raises(IntegrityError, match="truncated"):
        repo.load("net:1")
    assert "truncated" in repo.verify("net:1").error


def test_clobbered_header_is_a_corrupt_file(repo, version) -> None:
    with open(version.path, "r+b") as fh:
        fh.write(b"\0" * 8)
    report = repo.verify("net")
    assert not report.ok and "corrupt or unreadable HDF5 file" in report.error
    with pytest.raises(IntegrityError, match="corrupt"):
        repo.load("net")


def test_files_are_plain_hdf5_for_h5ls_and_h5dump(version) -> None:
    ls = subprocess.run(["h5ls", "-r", str(version.path)], capture_output=True, text=True)
    assert ls.returncode == 0, ls.stderr
    for name in (
        "/model/encoder.weight",
        "/aimass/packed",
        "/aimass/manifest",
        "/aimass/checksums",
    ):
        assert name in ls.stdout
    dump = subprocess.run(
        ["h5dump", "-d", "/aimass/metadata", str(version.path)], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert '\\"name\\":\\"net\\"' in dump.stdout or '"name":"net"' in dump.stdout
    header = subprocess.run(
        ["h5dump", "-H", "-A", str(version.path)], capture_output=True, text=True
    )
    assert header.returncode == 0 and "aimass_format" in header.stdout
