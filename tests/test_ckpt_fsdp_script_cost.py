"""Script mode with ``backend = "fsdp"`` on 2 local Gloo ranks: ``job.finish`` measures the
sharded final model as the whole model (both ranks run the measuring forward together), so
its version carries FLOPs per sample and peak memory and ``models search --flops`` finds it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_fsdp_script_mode import _setup
from test_script_mode_local import _result, _run

from aimass_hpc.cli import main
from aimass_hpc.repo import ModelRepository


def test_sharded_final_of_a_script_carries_its_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _setup(tmp_path, "costed")
    got = _run(run_dir, str(tmp_path / "train.py"), 2, 29600 + os.getpid() % 200, STEPS="4")
    assert [c for c, _ in got] == [0, 0], got
    ref = _result(run_dir)["final_ref"]
    version = ModelRepository(tmp_path / "repo").get(ref)
    assert version.metadata.get("shards")  # saved in pieces, one per rank
    # tinymodel: Linear(4, 8) -> Tanh -> Dropout -> Linear(8, 1), recipe input_shape [4].
    assert version.flops_per_sample == 2 * (4 * 8 + 8 * 1)
    assert version.peak_memory_bytes and version.peak_memory_bytes > 0
    with pytest.raises(SystemExit) as exc:
        main(["models", "--repo", str(tmp_path / "repo"), "search", "--flops", "10..100",
              "--json"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert exc.value.code in (0, None) and [v["ref"] for v in json.loads(out)] == [ref]
