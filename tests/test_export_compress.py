"""``aimass models export`` with --dtype, --quantize, --format onnx and --store.

Specification:
- --dtype bf16/fp16 casts floating tensors only; the file carries a recipe that rebuilds it,
  so it imports back and serves; size and the max/mean output difference are printed;
- --quantize int8 (torchao) stores int8 weights + per-row scales that the serving loader
  rebuilds (Int8Linear) with the same outputs as torchao's quantized module;
- --store keeps the result as a new version: parent, settings, size and delta recorded; the
  stored bf16/fp16/int8 versions load through serve/model_loader and answer over HTTP;
- --format onnx is checked with onnxruntime; over --tolerance it exits 1 and writes nothing
  (an existing file stays as it was, no temp file is left);
- no recipe, a bad --dtype/--quantize, contradictory flags: one line, exit 2;
- `aimass models export --help` imports neither torchao nor onnx.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aimass_hpc.cli import main
from aimass_hpc.repo import ModelRepository, compress
from aimass_hpc.serve import toymodels
from aimass_hpc.serve.local import LocalReplica
from aimass_hpc.serve.model_loader import load_from_repository

MLP: dict[str, Any] = {"in_features": 12, "hidden": 32, "out_features": 3, "depth": 2}
CNN: dict[str, Any] = {"channels": 2, "size": 8, "classes": 5, "width": 4}


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo")
    torch.manual_seed(0)
    repo.save(
        "mlp",
        toymodels.mlp(**MLP).state_dict(),
        recipe=toymodels.recipe(**MLP),
        tags=["demo"],
        metrics={"acc": 0.9},
    )
    repo.save(
        "cnn",
        toymodels.cnn(**CNN).state_dict(),
        recipe=toymodels.recipe("aimass_hpc.serve.toymodels:cnn", **CNN),
    )
    repo.save("bare", toymodels.mlp(**MLP).state_dict())  # no recipe
    return repo


@pytest.fixture
def cli(repo: ModelRepository, capsys: pytest.CaptureFixture[str]):  # noqa: ANN201
    def run(*args: str) -> tuple[Any, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(["models", "--repo", str(repo.root), *args])
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return run


def _original(repo: ModelRepository, ref: str) -> torch.nn.Module:
    return load_from_repository(repo.root, ref, "cpu").module


def _x(shape: tuple[int, ...], n: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_bf16_safetensors_export_imports_back_and_serves(repo, cli, tmp_path) -> None:
    out = tmp_path / "mlp-bf16.safetensors"
    code, stdout, err = cli("export", "mlp:1", str(out), "--dtype", "bf16")
    assert code == 0, err
    assert f"exported mlp:1 to {out} (safetensors, bfloat16)" in stdout
    assert "size 3.1 KiB (50% of 6.1 KiB); output vs original: max abs diff" in stdout
    tensors = load_file(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    src = repo.load("mlp:1").state_dict
    for k, t in tensors.items():  # the same values, rounded to bf16
        assert torch.equal(t, src[k].to(torch.bfloat16)), k
    code, stdout, err = cli("import", str(out), "mlp16")
    assert code == 0, err
    served = load_from_repository(repo.root, "mlp16:1", "cpu")
    x = _x((12,))
    got = served.forward(x.numpy())
    assert got.dtype == np.float32  # float32 in, float32 out
    want = _original(repo, "mlp:1")(x).numpy()
    assert np.abs(got - want).max() < 0.05


def test_cast_keeps_non_floating_tensors() -> None:
    sd = {"w": torch.randn(3, 3), "step": torch.tensor(7), "mask": torch.tensor([True, False])}
    out = compress.cast_state_dict(sd, "float16")
    assert out["w"].dtype == torch.float16
    assert out["step"].dtype == torch.int64 and int(out["step"]) == 7
    assert out["mask"].dtype == torch.bool


@pytest.mark.parametrize("dtype, name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_dtype_store_records_lineage_and_loads(repo, cli, dtype, name) -> None:
    code, stdout, err = cli("export", "cnn:1", "--dtype", dtype, "--store", "cnn", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["stored"] == "cnn:2" and report["dtype"] == name
    v = repo.get("cnn:2")
    assert v.parent == "cnn:1"
    assert v.run["export"]["dtype"] == name and v.run["export"]["source"] == "cnn:1"
    assert v.metrics["size_bytes"] == report["size_bytes"] == report["source_size_bytes"] / 2
    assert v.metrics["export_max_abs_diff"] == report["max_abs_diff"] > 0
    assert f"compressed-{name}" in v.tags
    stored = repo.load("cnn:2").state_dict
    assert {t.dtype for t in stored.values()} == {getattr(torch, name)}
    served = load_from_repository(repo.root, "cnn:2", "cpu")
    assert served.warm_up() is not None and served.output_shape == (5,)
    # The recorded delta is what the loaded module shows on the same random inputs.
    recipe = repo.get("cnn:1").recipe
    again = compress.output_delta(
        _original(repo, "cnn:1"), served.module, compress.random_inputs(recipe)
    )
    assert again["max_abs"] == pytest.approx(report["max_abs_diff"], rel=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int8-weight-only"])
def test_int8_matches_torchao_and_stores(repo, cli, scheme) -> None:
    from torchao import quantization

    code, stdout, err = cli("export", "mlp:1", "--quantize", scheme, "--store", "mlp-q")
    assert code == 0, err
    assert "stored " + scheme + " of mlp:1 as mlp-q:1" in stdout
    v = repo.get("mlp-q:1")
    assert v.parent == "mlp:1" and v.run["export"]["quantize"] == scheme
    assert v.run["export"]["quantizer"].startswith("torchao ")
    sd = repo.load("mlp-q:1").state_dict
    assert sd["0.weight"].dtype == torch.int8 and sd["0.weight_scale"].shape == (32,)
    assert sd["0.bias"].dtype == torch.float32
    # Served (plain torch Int8Linear) == torchao's own quantized module.
    reference = _original(repo, "mlp:1")
    config = compress.QUANT_SCHEMES[scheme]
    quantization.quantize_(reference, getattr(quantization, config)())
    served = load_from_repository(repo.root, "mlp-q:1", "cpu")
    x = _x((12,))
    with torch.inference_mode():
        want = reference(x)
    assert np.abs(served.forward(x.numpy()) - want.numpy()).max() < 1e-5
    assert v.metrics["size_bytes"] < 0.35 * repo.get("mlp:1").metadata["tensor_bytes"]


def test_int8_version_answers_over_http(repo, cli, tmp_path) -> None:
    assert cli("export", "mlp:1", "--quantize", "int8", "--store", "mlp")[0] == 0
    x = _x((12,), n=4)
    local = load_from_repository(repo.root, "mlp:2", "cpu").forward(x.numpy())
    with LocalReplica(tmp_path / "run", model="mlp:2", repo=repo.root) as rep:
        rep.wait_ready()
        r = httpx.post(
            f"{rep.url}/v1/predict",
            json={"inputs": x.tolist()},
            headers={"Authorization": f"Bearer {rep.token}"},
            trust_env=False,
            timeout=30,
        )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["outputs"]), local, rtol=1e-5, atol=1e-6)


def test_int8_torch_file_export(repo, cli, tmp_path) -> None:
    out = tmp_path / "q.pt"
    code, stdout, err = cli("export", "mlp:1", str(out), "--format", "torch", "--quantize", "int8")
    assert code == 0, err
    assert f"exported mlp:1 to {out} (torch, int8)" in stdout
    code, _, err = cli("import", str(out), "imported")
    assert code == 0, err
    assert repo.get("imported:1").recipe["factory"] == "aimass_hpc.repo.compress:int8_model"
    assert load_from_repository(repo.root, "imported:1", "cpu").warm_up() is not None


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_export_matches_onnxruntime(repo, cli, tmp_path, name) -> None:
    import onnxruntime as ort

    out = tmp_path / f"{name}.onnx"
    code, stdout, err = cli("export", f"{name}:1", str(out), "--format", "onnx")
    assert code == 0, err
    assert "onnxruntime matches torch within 0.0001, max abs diff" in stdout
    recipe = repo.get(f"{name}:1").recipe
    x = _x(tuple(recipe["input_shape"]), n=3)  # another batch size: the batch axis is dynamic
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        want = _original(repo, f"{name}:1")(x).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_onnx_over_tolerance_writes_nothing(repo, cli, tmp_path) -> None:
    out = tmp_path / "out" / "cnn.onnx"
    out.parent.mkdir()
    code, stdout, err = cli("export", "cnn:1", str(out), "--format", "onnx", "--tolerance", "1e-12")
    assert code == 1 and stdout == ""
    assert err.startswith("aimass: error: onnx export of cnn:1: onnxruntime differs from torch")
    assert err.rstrip().endswith("> tolerance 1e-12; nothing written") and err.count("\n") == 1
    assert list(out.parent.iterdir()) == []  # no file, no temp file
    out.write_bytes(b"previous")
    code, _, _ = cli(
        "export", "cnn:1", str(out), "--format", "onnx", "--tolerance", "1e-12", "--force"
    )
    assert code == 1 and out.read_bytes() == b"previous"
    assert list(out.parent.iterdir()) == [out]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["bare:1", "x.pt", "--dtype", "bf16"],
            "--dtype needs the model's recipe to rebuild it, and bare:1 has none",
        ),
        (["bare:1", "--quantize", "int8", "--store", "b"], "--quantize needs the model's recipe"),
        (["bare:1", "x.onnx", "--format", "onnx"], "--format onnx needs the model's recipe"),
        (["mlp:1", "x.pt", "--dtype", "int4"], "--dtype 'int4' is not supported: use bf16 or fp16"),
        (["mlp:1", "x.pt", "--quantize", "int4"], "--quantize 'int4' is not supported"),
        (["mlp:1", "x.pt", "--dtype", "bf16", "--quantize", "int8"], "not both"),
        (["mlp:1", "--store", "m"], "--store keeps a compressed copy"),
        (["mlp:1", "--dtype", "bf16"], "give PATH to write, or --store NAME"),
        (["mlp:1", "x.onnx", "--format", "onnx", "--dtype", "bf16"], "--format onnx exports"),
        (["mlp:1", "--dtype", "bf16", "--store", "bad name"], "invalid model name"),
    ],
)
def test_bad_requests_are_one_line(repo, cli, tmp_path, args, message) -> None:
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    code, stdout, err = cli("export", *args)
    assert code == 2 and stdout == ""
    assert err.startswith("aimass: error: ") and message in err and err.count("\n") == 1
    assert not any(tmp_path.glob("x.*"))
    assert [v.ref for v in repo.versions("mlp")] == ["mlp:1"]


def test_compressed_version_is_not_compressed_again(repo, cli) -> None:
    assert cli("export", "mlp:1", "--dtype", "bf16", "--store", "mlp")[0] == 0
    code, _, err = cli("export", "mlp:2", "--quantize", "int8", "--store", "mlp")
    assert code == 2 and "mlp:2 is already compressed (bfloat16); compress its parent mlp:1" in err


def test_plain_export_unchanged(repo, cli, tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    code, stdout, _ = cli("export", "mlp:1", str(out))
    assert code == 0 and stdout.strip() == f"exported mlp:1 to {out} (safetensors)"
    assert {t.dtype for t in load_file(out).values()} == {torch.float32}


def test_help_imports_no_export_backend() -> None:
    code = (
        "import sys\n"
        "from aimass_hpc.cli import main\n"
        "try:\n"
        "    main(['models', 'export', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "bad = [m for m in ('torchao', 'onnx', 'onnxruntime', 'aimass_hpc.repo.compress') "
        "if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "--quantize" in out and "LOADED []" in out
