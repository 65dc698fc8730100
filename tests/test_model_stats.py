"""FLOPs, peak memory and model type: measured, recorded with final models, searchable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from aimass_hpc.cli import main
from aimass_hpc.common.errors import InputError
from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime.checkpoint import RepositoryStore
from aimass_hpc.runtime.config import TrainParams
from aimass_hpc.runtime.model_stats import (
    ModelStats,
    measure,
    model_type_of,
    sample_from_dataset,
    sample_input,
    stats_from_recipe,
)
from aimass_hpc.runtime.task import TrainTask
from aimass_hpc.runtime.trainer import Trainer
from aimass_hpc.serve import toymodels


def mlp(i: int = 8, h: int = 16, o: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_sample_input_follows_the_recipe() -> None:
    x = sample_input(toymodels.recipe(in_features=12))
    assert x is not None and x.shape == (1, 12) and x.dtype == torch.float32
    x = sample_input({"input_shape": [3, 4, 4], "input_dtype": "int64"})
    assert x is not None and x.shape == (1, 3, 4, 4) and x.dtype == torch.int64
    # Nothing definite to measure with: no recipe, no shape, a free dimension, a strange dtype.
    for recipe in (None, {}, {"input_shape": [-1, 8]}, {"input_shape": [8], "input_dtype": "c"}):
        assert sample_input(recipe) is None, recipe


def test_measure_counts_matmul_flops_and_cpu_memory() -> None:
    model = mlp()
    model.train()
    stats = measure(model, torch.zeros(1, 8))
    assert stats.flops_per_sample == 2 * (8 * 16 + 16 * 3)  # a multiply-add is 2 FLOPs
    params = sum(p.numel() * 4 for p in model.parameters())
    activations = (16 + 16 + 3) * 4  # the outputs of Linear, ReLU, Linear
    assert stats.peak_memory_bytes == params + 8 * 4 + activations
    assert model.training  # put back as it was


def test_measure_without_a_sample_or_on_a_wrong_one_measures_nothing() -> None:
    assert measure(mlp(), None) == ModelStats()
    assert measure(mlp(), torch.zeros(1, 5)) == ModelStats()  # 5 inputs into Linear(8, ...)


def test_tied_weights_count_once() -> None:
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    stats = measure(nn.Sequential(emb, head), torch.zeros(1, 4, dtype=torch.int64))
    assert stats.peak_memory_bytes is not None
    assert stats.peak_memory_bytes < 2 * 100 * 8 * 4  # the shared matrix once


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.CrossEntropyLoss()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(a, b)


def test_model_type_from_declaration_recipe_or_loss() -> None:
    assert model_type_of(loss=nn.CrossEntropyLoss()) == "classifier"
    assert model_type_of(loss=Wrapped()) == "classifier"  # a wrapper around a known loss
    assert model_type_of(loss=nn.MSELoss()) == "regressor"
    assert model_type_of(loss=nn.TripletMarginLoss()) == "embedding"
    assert model_type_of(loss=lambda a, b: (a - b).sum()) == "other"
    lm = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    tokens = torch.zeros(1, 6, dtype=torch.int64)
    assert model_type_of(loss=nn.CrossEntropyLoss(), model=lm, sample=tokens) == "language-model"
    assert model_type_of(recipe={"model_type": "detection"}, loss=nn.MSELoss()) == "detection"
    assert model_type_of(declared="generative", recipe={"model_type": "other"}) == "generative"
    with pytest.raises(InputError, match="recipe.model_type 'robot' is not one of classifier"):
        model_type_of(recipe={"model_type": "robot"})
    with pytest.raises(TypeError, match="model_type 'robot' is not one of"):
        TrainTask.coerce({"model": mlp(), "train": (torch.zeros(2, 8), torch.zeros(2)),
                          "loss": nn.MSELoss(), "model_type": "robot"}, "t")  # fmt: skip


def test_repository_validates_and_searches_model_type(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.save("a", {"w": torch.ones(2)}, model_type="classifier", flops_per_sample=5e3)
    repo.save("b", {"w": torch.ones(2)}, model_type="regressor", flops_per_sample=5e3)
    with pytest.raises(InputError, match="model_type 'cat' is not one of"):
        repo.save("a", {"w": torch.ones(2)}, model_type="cat")
    assert [v.ref for v in repo.search(model_type="classifier")] == ["a:1"]
    assert repo.get("b:1").model_type == "regressor"
    with pytest.raises(InputError, match="model type 'cat'"):
        repo.search(model_type="cat")


def _digits_like_task() -> TrainTask:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g)
    y = (x[:, 0] > 0).long()
    return TrainTask(model=mlp(64, 64, 10), train=(x, y), loss=nn.CrossEntropyLoss())


def test_trainer_records_cost_and_type_of_the_final_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo_dir = tmp_path / "repo"
    store = RepositoryStore(repo_dir, "tiny", tmp_path / "run")
    (tmp_path / "run").mkdir()
    params = TrainParams(batch_size=16, steps=4, checkpoint_every=2)
    result = Trainer(_digits_like_task(), params, store=store).fit()
    final = ModelRepository(repo_dir).get(result.final_ref)
    assert final.flops_per_sample == 2 * (64 * 64 + 64 * 10)  # from the first training input
    assert final.peak_memory_bytes and final.peak_memory_bytes > 0
    assert final.model_type == "classifier"
    ckpt = ModelRepository(repo_dir).get(result.checkpoint_ref)
    assert ckpt.flops_per_sample is None  # only final models are measured
    code, out, _ = cli(
        capsys, "models", "--repo", str(repo_dir), "search", "--type", "classifier",
        "--flops", "1K..10M", "--memory", "..64M", "--json",
    )  # fmt: skip
    assert code == 0 and [v["ref"] for v in json.loads(out)] == [result.final_ref]
    code, out, _ = cli(capsys, "models", "--repo", str(repo_dir), "search", "--type",
                       "regressor", "--json")  # fmt: skip
    assert code == 0 and json.loads(out) == []
    # Units: --flops counts are decimal (1K = 1000), --memory sizes binary (1K = 1024).
    flops = int(final.flops_per_sample)
    code, out, _ = cli(capsys, "models", "--repo", str(repo_dir), "search", "--flops",
                       f"{flops / 1000}K..{flops / 1000}K", "--json")  # fmt: skip
    assert [v["ref"] for v in json.loads(out)] == [result.final_ref]
    mem = final.peak_memory_bytes
    code, out, _ = cli(capsys, "models", "--repo", str(repo_dir), "search", "--memory",
                       f"{mem / 1024}K..{mem / 1024}K", "--json")  # fmt: skip
    assert [v["ref"] for v in json.loads(out)] == [result.final_ref]
    code, out, _ = cli(capsys, "models", "--repo", str(repo_dir), "show", result.final_ref)
    assert code == 0 and "classifier" in out and "FLOP" in out
    code, _, err = cli(capsys, "models", "--repo", str(repo_dir), "search", "--type", "robot")
    assert code == 2 and "'robot' is not one of" in err


def test_search_help_states_the_units(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "models", "search", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "Counts are decimal: k/K/M/G/T/P are powers of 1000" in text
    assert "Sizes are binary, as in Slurm" in text and "powers of 1024" in text


def test_import_with_a_recipe_measures_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = toymodels.mlp(in_features=16, hidden=32, out_features=4)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    recipe = toymodels.recipe(in_features=16, hidden=32, out_features=4)
    recipe["model_type"] = "classifier"
    repo = str(tmp_path / "repo")
    code, out, err = cli(capsys, "models", "--repo", repo, "import", str(path), "toy",
                         "--recipe", json.dumps(recipe))  # fmt: skip
    assert code == 0, err
    v = ModelRepository(repo).get("toy")
    expected = stats_from_recipe(recipe, model.state_dict())
    assert v.flops_per_sample == expected["flops_per_sample"] > 0
    assert v.peak_memory_bytes == expected["peak_memory_bytes"] > 0
    assert v.model_type == "classifier"
    # --type wins over the recipe; a recipe that cannot be built still imports, with a note.
    bad = {**recipe, "factory": "no_such_module_xyz:build"}
    code, out, err = cli(capsys, "models", "--repo", repo, "import", str(path), "toy",
                         "--recipe", json.dumps(bad), "--type", "regressor")  # fmt: skip
    assert code == 0 and "FLOPs and memory not measured" in err
    v2 = ModelRepository(repo).get("toy")
    assert v2.number == 2 and v2.model_type == "regressor" and v2.flops_per_sample is None
    # Without a recipe nothing is measured (and nothing is said).
    code, out, err = cli(capsys, "models", "--repo", repo, "import", str(path), "plain")
    assert code == 0 and err == "" and ModelRepository(repo).get("plain").flops_per_sample is None


def test_sample_from_dataset() -> None:
    x = sample_from_dataset(torch.utils.data.TensorDataset(torch.ones(3, 5), torch.zeros(3)))
    assert x is not None and x.shape == (1, 5)
    assert sample_from_dataset([("text", 1)]) is None
