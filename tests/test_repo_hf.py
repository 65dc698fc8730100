"""Hugging Face directories in the repository (aimass_hpc/repo/hf.py, `aimass models import-hf`).

A small HF-shaped directory is written by hand here (config.json, tokenizer files, safetensors
weights through `safetensors.numpy`): no transformers needed in the main environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from aimass_hpc.common.errors import InputError, IntegrityError
from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo.hf import import_hf, is_hf, materialize

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 8,
    "max_position_embeddings": 128,
    "torch_dtype": "float32",
}


def make_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (path / "tokenizer_config.json").write_text("{}")
    rng = np.random.default_rng(0)
    save_file(
        {"embed.weight": rng.standard_normal((300, 8)).astype(np.float32),
         "lm_head.weight": rng.standard_normal((300, 8)).astype(np.float32)},
        str(path / "model.safetensors"),
    )  # fmt: skip
    (path / "README.md").write_text("not stored")  # only config/tokenizer/weights files are
    return path


def test_round_trip_is_byte_exact(tmp_path: Path) -> None:
    src = make_hf_dir(tmp_path / "src")
    repo = ModelRepository(tmp_path / "repo")
    v = import_hf(repo, src, "tiny", tags=["hf"])
    assert v.ref == "tiny:1" and v.kind == "hf" and is_hf(repo.get("tiny:1"))
    r = repo.get("tiny:1").recipe
    assert r["architectures"] == ["LlamaForCausalLM"] and r["model_type"] == "llama"
    assert r["parameters"] == 2 * 300 * 8 and r["vocab_size"] == 300
    assert repo.get("tiny:1").param_count == r["parameters"]  # what `models show` prints
    assert r["context_length"] == 128
    assert sorted(f["name"] for f in r["files"]) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    out = materialize(repo, "tiny:latest", tmp_path / "out")
    for f in r["files"]:
        assert (out / f["name"]).read_bytes() == (src / f["name"]).read_bytes()
    assert not (out / "README.md").exists()
    # Materializing the same version again reuses the directory (its stamp says so).
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert materialize(repo, "tiny:1", out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # No temp directory is left next to it.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_second_import_is_a_new_version_and_replaces_a_materialized_one(tmp_path: Path) -> None:
    src = make_hf_dir(tmp_path / "src")
    repo = ModelRepository(tmp_path / "repo")
    import_hf(repo, src, "tiny")
    materialize(repo, "tiny:1", tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": 301}))
    assert import_hf(repo, src, "tiny").number == 2
    out = materialize(repo, "tiny:2", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 301


@pytest.mark.parametrize(
    ("remove", "named"),
    [("config.json", "config.json"), ("model.safetensors", "model.safetensors"),
     ("tokenizer.json", "tokenizer.json")],
)  # fmt: skip
def test_bad_directory_is_one_line_naming_the_missing_file(
    tmp_path: Path, remove: str, named: str
) -> None:
    src = make_hf_dir(tmp_path / "src")
    (src / remove).unlink()
    with pytest.raises(InputError) as err:
        import_hf(ModelRepository(tmp_path / "repo"), src, "tiny")
    message = str(err.value)
    assert "\n" not in message and f"missing {named}" in message and str(src) in message


def test_not_a_directory_and_not_an_hf_version(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(InputError, match="not a directory"):
        import_hf(repo, tmp_path / "nope", "tiny")
    repo.save("plain", {"w": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match="plain:1 is not a Hugging Face model"):
        materialize(repo, "plain:1", tmp_path / "out")


def test_a_file_changed_in_the_recipe_is_an_integrity_error(tmp_path: Path) -> None:
    """The SHA-256 in the recipe guards the bytes written out (not only HDF5's checksums)."""
    src = make_hf_dir(tmp_path / "src")
    repo = ModelRepository(tmp_path / "repo")
    v = import_hf(repo, src, "tiny")
    sidecar = next(v.path.parent.glob("*00000001*.json"))
    doc = json.loads(sidecar.read_text())
    doc["recipe"]["files"][0]["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="fails its sum"):
        materialize(repo, "tiny:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_hf(tmp_path: Path) -> None:
    src = make_hf_dir(tmp_path / "src")
    run = [sys.executable, "-m", "aimass_hpc", "models", "--repo", str(tmp_path / "repo")]
    ok = subprocess.run([*run, "import-hf", str(src), "tiny", "--tag", "base"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "imported tiny:1: LlamaForCausalLM" in ok.stdout and "vocab 300" in ok.stdout
    (src / "config.json").unlink()
    bad = subprocess.run([*run, "import-hf", str(src), "tiny"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "missing config.json" in bad.stderr
