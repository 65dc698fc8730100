"""Round trips through the model repository: every dtype and shape, optimizer and RNG state
exactly, metadata, mapping without copies, alignment, many small tensors."""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo.codec import TORCH_DTYPES

ALL_DTYPES = [getattr(torch, n) for n in TORCH_DTYPES if hasattr(torch, n)]
SHAPES = [(), (0,), (3, 0, 2), (7,), (5, 3), (300, 300)]


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits of any dtype (NaN payloads, fp8 specials and all)."""
    gen = torch.Generator().manual_seed(seed)
    itemsize = dtype.itemsize
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def deep_equal(a, b) -> bool:  # noqa: ANN001 - test helper over arbitrary structures
    """Equality that also insists on identical types (tuple vs list, int vs float, ...)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("alignment", [4096, 1 << 20])
def test_every_dtype_and_shape_round_trips_bit_exactly(repo, alignment) -> None:
    sd = {}
    for i, dtype in enumerate(ALL_DTYPES):
        for j, shape in enumerate(SHAPES):
            sd[f"{dtype}.{j}"] = random_tensor(dtype, shape, seed=i * 100 + j)
    v = repo.save("dtypes", sd, alignment=alignment)
    for mmap in (True, False):
        loaded = repo.load(v.ref, mmap=mmap).state_dict
        assert list(loaded) == list(sd)
        for key, t in sd.items():
            assert_same(t, loaded[key])
    assert repo.verify(v.ref).ok
    assert v.metadata["dtypes"]["bfloat16"] == len(SHAPES)


def test_non_contiguous_and_view_tensors(repo) -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    c = torch.randn(4, 4, dtype=torch.complex64)
    sd = {
        "transposed": base.T,
        "strided": base[:, ::3],
        "expanded": torch.arange(3.0).expand(5, 3),
        "conj": c.conj(),
        "negview": torch._neg_view(base),
        "narrow": base.narrow(1, 2, 3),
        "bf16_slice": base.to(torch.bfloat16)[1::2, 1:7],
        "requires_grad": torch.nn.Parameter(torch.ones(3)),
    }
    loaded = repo.load(repo.save("views", sd).ref).state_dict
    for key, t in sd.items():
        expect = t.detach().resolve_conj().resolve_neg()
        assert loaded[key].is_contiguous()
        assert_same(expect, loaded[key])


def test_thousands_of_small_tensors_and_a_few_large(repo) -> None:
    sd = OrderedDict((f"layers.{i}.bias", torch.full((i % 7 + 1,), float(i))) for i in range(5000))
    sd["embed.weight"] = torch.randn(512, 1024)
    v = repo.save("many", sd)
    assert v.metadata["tensor_count"] == 5001
    ckpt = repo.load("many")
    assert list(ckpt.state_dict) == list(sd)
    for key, t in sd.items():
        assert_same(t, ckpt.state_dict[key])
    assert repo.verify("many").tensors == 5001
    with h5py.File(v.path, "r", locking=False) as f:
        assert len(f["model"]) == 1  # the small ones share the packed dataset


def test_tied_weights_stay_tied_and_are_stored_once(repo) -> None:
    emb = torch.randn(64, 32)
    sd = {"embed.weight": emb, "head.weight": emb, "other": emb.clone()}
    v = repo.save("tied", sd)
    assert v.metadata["tensor_count"] == 2
    loaded = repo.load("tied").state_dict
    assert loaded["embed.weight"] is loaded["head.weight"]
    assert loaded["other"] is not loaded["embed.weight"]
    assert torch.equal(loaded["other"], emb)


def test_large_tensors_are_aligned_and_mapped_without_copy(repo) -> None:
    sd = {"a": torch.randn(3, 100_000), "b": torch.randn(1024, 1024).to(torch.bfloat16)}
    v = repo.save("aligned", sd, alignment=1 << 20)
    with h5py.File(v.path, "r", locking=False) as f:
        for name in ("model/a", "model/b", "aimass/packed"):
            if name in f:
                assert f[name].id.get_offset() % (1 << 20) == 0, name
        assert f["model/b"].attrs["dtype"] == "bfloat16"
        assert f["model/b"].dtype == np.uint16
    mapped = repo.load("aligned", mmap=True).state_dict
    copied = repo.load("aligned", mmap=False).state_dict
    spans = _file_mappings(v.path)
    assert spans, "the version file is not mapped"
    assert any(lo <= mapped["a"].data_ptr() < hi for lo, hi in spans)
    assert not any(lo <= copied["a"].data_ptr() < hi for lo, hi in spans)
    assert torch.equal(mapped["b"].float(), sd["b"].float())
    mapped["a"][0, 0] = 42.0  # copy-on-write: writable, and the file is unchanged
    assert repo.verify("aligned").ok


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi))
    return spans


def test_optimizer_and_rng_state_resume_bit_identically(repo) -> None:
    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    gen = torch.Generator().manual_seed(7)

    def train(model, opt, sched, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(8, 4, generator=gen) + torch.randn(8, 4)  # two torch RNG streams
            noise = torch.from_numpy(np.random.normal(size=(8, 1)).astype(np.float32))
            y = x.sum(1, keepdim=True) * random.random() + noise
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    model, opt, sched = build(0)
    np.random.seed(1)
    random.seed(2)
    train(model, opt, sched, 3)
    extra = {
        "rng": {
            "torch": torch.get_rng_state(),
            "generator": gen.get_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        "scheduler": sched.state_dict(),
        "data_position": {"epoch": 0, "batch": 3},
    }
    saved_groups = copy.deepcopy(opt.state_dict()["param_groups"])
    v = repo.save("resume", model.state_dict(), optimizer=opt.state_dict(), extra=extra)
    assert v.contents == ["model", "optimizer", "rng", "scheduler", "data_position"]
    train(model, opt, sched, 4)
    expected = {k: t.clone() for k, t in model.state_dict().items()}
    expected_opt = opt.state_dict()

    model2, opt2, sched2 = build(99)
    ckpt = repo.load("resume")
    model2.load_state_dict(ckpt.state_dict)
    opt2.load_state_dict(ckpt.optimizer)
    sched2.load_state_dict(ckpt.extra["scheduler"])
    rng = ckpt.extra["rng"]
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["generator"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    assert deep_equal(ckpt.optimizer["param_groups"], saved_groups)  # betas stay a tuple
    train(model2, opt2, sched2, 4)
    for key, t in model2.state_dict().items():
        assert torch.equal(t, expected[key]), key
    for pid, state in opt2.state_dict()["state"].items():
        for key, t in state.items():
            assert torch.equal(t, expected_opt["state"][pid][key]), (pid, key)


def test_exotic_python_values_round_trip_exactly(repo) -> None:
    extra = {
        "tuple_in_tuple": (3, (1, 2), None),
        "int_keys": {0: "a", 1: {2: "b"}},
        "mixed_keys": {(1, 2): "tuple key", 3.5: "float key", None: "none"},
        "marker_like": {"__tuple__": [1, 2]},
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-310, 0.1],
        "bigint": 2**100,
        "bytes": b"\x00\xff" * 10,
        "bytearray": bytearray(b"abc"),
        "complex": 1 + 2j,
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.float16(0.1)],
        "np_arrays": [np.arange(5, dtype=">i4"), np.array(["ab", "c"]), np.zeros((0, 2))],
        "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        "dates": np.array(["2024-01-01"], dtype="datetime64[D]"),
        "pcg": np.random.default_rng(5).bit_generator.state,
        "set": {1, 2, 3},
        "frozen": frozenset({"x"}),
        "torch_things": [torch.float16, torch.device("cpu"), torch.Size([2, 3])],
        "ordered": OrderedDict([("z", 1), ("a", 2)]),
        "empty": [{}, [], ()],
    }
    loaded = repo.load(repo.save("exotic", None, extra=extra).ref).extra
    for key in extra:
        assert deep_equal(extra[key], loaded[key]), key
    assert isinstance(loaded["ordered"], OrderedDict)


def test_state_dict_metadata_and_non_tensor_values(repo) -> None:
    model = torch.nn.BatchNorm1d(4)
    sd = model.state_dict()
    sd["numpy_weight"] = np.ones((2, 2), dtype=np.float32)
    sd["big_endian"] = np.arange(3, dtype=">i4")
    sd["_extra_state"] = {"scale": 0.5, "ids": (1, 2)}
    loaded = repo.load(repo.save("bn", sd).ref).state_dict
    assert isinstance(loaded["numpy_weight"], torch.Tensor)
    assert torch.equal(loaded["big_endian"], torch.arange(3, dtype=torch.int32))
    assert loaded["_extra_state"] == {"scale": 0.5, "ids": (1, 2)}
    assert loaded._metadata == sd._metadata
    marker_key = repo.load(repo.save("odd", {"__tensor__": torch.ones(1)}).ref).state_dict
    assert torch.equal(marker_key["__tensor__"], torch.ones(1))
    del loaded["big_endian"], loaded["_extra_state"]
    torch.nn.BatchNorm1d(4).load_state_dict(
        {k: v for k, v in loaded.items() if k != "numpy_weight"}
    )


def test_metadata_is_recorded_and_readable_without_tensors(repo, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("AIMASS_GIT_COMMIT", "abc123")
    first = repo.save("meta", {"w": torch.zeros(2, 3)})
    v = repo.save(
        "meta",
        {"w": torch.zeros(2, 3), "b": torch.zeros(3)},
        metrics={"acc": torch.tensor(0.75), "loss": np.float32(0.5)},
        tags=["best", "fp32"],
        parent=first.number,
        hyperparameters={"lr": 0.1, "layers": [2, 3]},
        flops_per_sample=1.5e9,
        peak_memory_bytes=3 << 30,
        description="second",
        recipe={"factory": "mod:fn", "kwargs": {"d": 3}, "input_shape": [3]},
        run={"job_id": "4242", "run_dir": "/runs/x"},
    )
    got = repo.get("meta")
    assert got == v and got.ref == "meta:2"
    m = got.metadata
    assert m["slurm_job_id"] == "4242" and m["git_commit"] == "abc123"
    assert m["user"] and m["host"] and got.created.endswith("Z")
    assert m["framework"]["torch"] == torch.__version__
    assert got.metrics == {"acc": 0.75, "loss": 0.5}
    assert got.tags == ["best", "fp32"] and got.parent == "meta:1"
    assert got.param_count == 9 and got.kind == "model" and got.contents == ["model"]
    assert got.flops_per_sample == 1.5e9 and got.peak_memory_bytes == 3 << 30
    assert got.recipe["factory"] == "mod:fn" and got.run["run_dir"] == "/runs/x"
    manifest = repo.manifest("meta:2")
    assert [(e["name"], e["dtype"], e["shape"], e["nbytes"]) for e in manifest] == [
        ("model/w", "float32", [2, 3], 24),
        ("model/b", "float32", [3], 12),
    ]
    # Metadata comes from the sidecar: even a file with garbage tensors lists and shows.
    with open(v.path, "r+b") as fh:
        fh.seek(v.file_size - 64)
        fh.write(b"\xff" * 64)
    assert repo.get("meta:2").metrics["acc"] == 0.75
    assert [x.number for x in repo.versions("meta")] == [1, 2]


def test_bad_input_is_refused_with_clear_errors(repo) -> None:
    with pytest.raises(InputError, match="invalid model name"):
        repo.save("../escape", {})
    with pytest.raises(InputError, match="cannot store a builtins.object at 'extra/x'"):
        repo.save("m", {}, extra={"x": object()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch itself
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(InputError, match="quantized"):
        repo.save("m", {"q": q})
    with pytest.raises(InputError, match="metric 'acc' must be a number"):
        repo.save("m", {}, metrics={"acc": "high"})
    with pytest.raises(InputError, match="recipe must be plain JSON"):
        repo.save("m", {}, recipe={"f": object()})
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        repo.save("m", {}, parent="nope:1")
    assert repo.names() == []  # nothing was allocated or left behind


def test_device_moves_the_state_dict_only(repo) -> None:
    """``device`` applies to model tensors; optimizer/extra stay on the CPU (set_rng_state)."""
    v = repo.save(
        "dev",
        {"w": torch.ones(3)},
        optimizer={"m": torch.zeros(2)},
        extra={"rng": torch.get_rng_state()},
    )
    ckpt = repo.load(v.ref, device="meta")  # a device every CPU build has
    assert ckpt.state_dict["w"].device.type == "meta"
    assert ckpt.optimizer["m"].device.type == "cpu"
    torch.set_rng_state(ckpt.extra["rng"])
