"""``aimass models rm NAME:LO..HI`` and ``models ls NAME`` keeping checkpoints apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aimass_hpc.cli import main
from aimass_hpc.common.errors import ConflictError, InputError
from aimass_hpc.common.units import parse_range
from aimass_hpc.repo import ModelRepository
from aimass_hpc.repo.refs import VersionRange


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    """m:1..8: checkpoints (weights + optimizer) except 4 and 8, which are final models."""
    repo = ModelRepository(tmp_path / "repo")
    for n in range(1, 9):
        final = n in (4, 8)
        repo.save(
            "m",
            {"w": torch.full((3,), float(n))},
            optimizer=None if final else {"state": {}, "param_groups": []},
            metrics={"acc": n / 10},
        )
    return repo


@pytest.fixture
def cli(repo: ModelRepository, capsys: pytest.CaptureFixture[str]):  # noqa: ANN201
    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(["models", "--repo", str(repo.root), *args])
        out, err = capsys.readouterr()
        return int(exc.value.code or 0), out, err

    return run


def test_version_range_parsing() -> None:
    assert VersionRange.parse("m:3..7") == VersionRange("m", 3, 7)
    assert VersionRange.parse("m:..7") == VersionRange("m", None, 7)
    assert VersionRange.parse("m:3..") == VersionRange("m", 3, None)
    assert str(VersionRange("m", 3, None)) == "m:3.."
    for not_a_range in ("m:3", "m", "m@prod", "m:latest"):
        assert VersionRange.parse(not_a_range) is None
    for bad, msg in (
        ("m:..", "give at least one end"),
        ("m:7..3", "7 is after 3"),
        ("m:0..3", "positive integers"),
        ("m:a..3", "positive integers"),
        ("m:1..2..3", "positive integers"),
        ("-m:1..2", "invalid model name"),
    ):
        with pytest.raises(InputError, match=msg):
            VersionRange.parse(bad, "NAME:LO..HI")


def test_value_ranges_take_dots_or_colon() -> None:
    assert parse_range("1K..10M", "--flops", "count") == (1e3, 1e7)
    assert parse_range("..64M", "--memory", "memory") == (None, 64 << 20)
    assert parse_range(":64M", "--memory", "memory") == (None, 64 << 20)
    assert parse_range("0.5..", "acc") == (0.5, None)
    assert parse_range("-1:0.5", "acc") == (-1.0, 0.5)


def test_repository_range_delete(repo: ModelRepository) -> None:
    assert [v.number for v in repo.versions_between("m", 3, 5)] == [3, 4, 5]
    assert [v.number for v in repo.delete_range("m", 3, 5, dry_run=True)] == [3, 4, 5]
    assert repo.version_numbers("m") == list(range(1, 9))  # a dry run deletes nothing
    repo.promote("m", 4, "prod")
    with pytest.raises(ConflictError, match=r"m:3..5 includes aliased version\(s\) m:4 \(prod\)"):
        repo.delete_range("m", 3, 5)
    assert repo.version_numbers("m") == list(range(1, 9))  # refused before deleting any
    assert [v.number for v in repo.delete_range("m", 3, 5, force=True)] == [3, 4, 5]
    assert repo.version_numbers("m") == [1, 2, 6, 7, 8]


def test_rm_ranges_through_the_cli(cli, repo: ModelRepository) -> None:
    code, out, _ = cli("rm", "m:3..5", "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        "would delete m:3 (checkpoint)",
        "would delete m:4 (model)",
        "would delete m:5 (checkpoint)",
        "would delete 3 version(s)",
    ]
    assert repo.version_numbers("m") == list(range(1, 9))
    repo.promote("m", 7, "best")
    code, _, err = cli("rm", "m:6..", "--yes")
    assert code == 4 and "m:6.. includes aliased version(s) m:7 (best)" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, _ = cli("rm", "m:..2", "m:5", "--yes")
    assert code == 0 and out == "deleted m:1\ndeleted m:2\ndeleted m:5\n"
    code, out, _ = cli("rm", "m:6..", "--yes", "--force")
    assert code == 0 and out == "deleted m:6\ndeleted m:7\ndeleted m:8\n"
    assert repo.version_numbers("m") == [3, 4]
    code, _, err = cli("rm", "m:10..12", "--yes")
    assert code == 3 and "model m has no versions in m:10..12" in err
    code, _, err = cli("rm", "m:5..2", "--yes")
    assert code == 2 and "NAME:LO..HI: invalid version range 'm:5..2': 5 is after 2" in err
    code, _, err = cli("rm", "m:..", "--yes")
    assert code == 2 and "give at least one end" in err


def test_ls_keeps_checkpoints_apart(cli) -> None:
    code, out, _ = cli("ls", "m")
    assert code == 0
    assert "m:4" in out and "m:8" in out and "m:3" not in out
    assert "6 checkpoint(s), newest m:7" in out and "aimass models ls m --checkpoints" in out
    code, out, _ = cli("ls", "m", "--checkpoints")
    assert code == 0 and "m:7" in out and "m:4" not in out
    code, out, _ = cli("ls", "m", "--json")
    rows = json.loads(out)
    assert [(r["ref"], r["kind"]) for r in rows][:4] == [
        ("m:1", "checkpoint"),
        ("m:2", "checkpoint"),
        ("m:3", "checkpoint"),
        ("m:4", "model"),
    ]
    code, out, _ = cli("ls", "m", "--json", "--checkpoints")
    assert [r["version"] for r in json.loads(out)] == [1, 2, 3, 5, 6, 7]


def test_ls_shows_type_and_cost_on_a_wide_terminal(
    cli, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.save("m", {"w": torch.ones(3)}, model_type="regressor", flops_per_sample=2.5e6,
              peak_memory_bytes=3 << 20)  # fmt: skip
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli("ls", "m")
    assert code == 0 and "regressor" in out and "2.5MFLOP/3.0 MiB" in out
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli("ls", "m")
    assert code == 0 and "regressor" not in out  # no room: models show has it
    code, out, _ = cli("show", "m:9")
    assert "regressor" in out and "2.5MFLOP" in out and "3.0 MiB" in out
