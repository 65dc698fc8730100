"""A repository that was damaged or tampered with: one-line errors, nothing followed out.

Specification:
- a malformed alias file (not JSON, not UTF-8, empty, ``null``, ``[]``, a bad ``version``,
  ``stack`` or ``log``) makes every ``aimass models`` command that reads it exit 6 with one
  line naming the file and what is wrong; ``promote`` refuses to overwrite it unless
  ``--repair``, which keeps a copy and records the repair in the new history;
- a metadata sidecar with wrong types is ignored in favour of the file's own metadata;
  a version file that is not HDF5, empty or a directory is exit 6, never a traceback;
- a sharded version's metadata cannot name a shard file outside its shard directory
  (absolute, ``..``, a link leading out): IntegrityError naming the version and path;
- a model directory that is a symbolic link out of the repository is neither written
  through by saves nor read through by loads, listings or gc.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from aimass_hpc.cli import main
from aimass_hpc.common.errors import IntegrityError
from aimass_hpc.repo import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo")
    for i in range(3):
        repo.save("net", {"w": torch.full((4,), float(i))}, metrics={"acc": i / 10})
    repo.promote("net", 1, "prod")
    repo.promote("net", 2, "prod")
    return repo


@pytest.fixture
def cli(repo: ModelRepository, capsys: pytest.CaptureFixture[str]):  # noqa: ANN201
    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main(["models", "--repo", str(repo.root), *args])
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return run


def _alias(repo: ModelRepository) -> Path:
    return repo.root / "models" / "net" / "aliases" / "prod.json"


BAD_ALIASES = {
    "version-str": (b'{"version": "abc"}', "\"version\" is 'abc'"),
    "null": (b"null", "holds null"),
    "list": (b"[]", "holds list"),
    "invalid-json": (b'{"version": 2', "not valid JSON"),
    "not-utf8": (b'\xff\xfe{"version": 2}', "not UTF-8"),
    "negative": (b'{"version": -1}', '"version" is -1'),
    "float": (b'{"version": 1.5}', '"version" is 1.5'),
    "bool": (b'{"version": true}', '"version" is True'),
    "empty": (b"", "empty file"),
    "stack": (b'{"version": 2, "stack": ["a"]}', '"stack"'),
    "log": (b'{"version": 2, "stack": [1, 2], "log": 5}', '"log"'),
}
COMMANDS = [
    ("show", "net@prod"),
    ("aliases", "net"),
    ("aliases", "net@prod"),
    ("promote", "net:3", "prod"),
    ("rollback", "net@prod"),
    ("ls",),
    ("ls", "net"),
    ("rm", "-y", "net:1"),
]


@pytest.mark.parametrize("case", sorted(BAD_ALIASES))
def test_malformed_alias_file_is_one_line_exit_6(repo, cli, case: str) -> None:
    content, words = BAD_ALIASES[case]
    _alias(repo).write_bytes(content)
    for args in COMMANDS:
        code, _, err = cli(*args)
        assert code == 6, (args, err)
        line = err.strip()
        assert "\n" not in line and "Traceback" not in line, (args, err)
        assert str(_alias(repo)) in line and words in line, (args, line)
    assert _alias(repo).read_bytes() == content  # nothing was overwritten
    assert repo.version_numbers("net") == [1, 2, 3]  # rm refused: it could not tell


def test_alias_that_is_a_directory_is_exit_6(repo, cli) -> None:
    _alias(repo).unlink()
    _alias(repo).mkdir()
    code, _, err = cli("show", "net@prod")
    assert code == 6 and "is a directory" in err and str(_alias(repo)) in err


def test_promote_repair_keeps_the_damaged_file_and_says_so(repo, cli) -> None:
    _alias(repo).write_bytes(b'{"version": "abc", "log": [{"action": "promote"}]}')
    code, out, err = cli("promote", "--repair", "net:3", "prod")
    assert code == 0, err
    assert "net@prod -> net:3" in out and "kept as" in err and "repaired" in err
    kept = [p for p in _alias(repo).parent.iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1 and b'"abc"' in kept[0].read_bytes()
    assert repo.aliases("net") == {"prod": 3}  # the copy is hidden, not an alias
    history = repo.alias_history("net", "prod")
    assert history[0]["action"] == "repair" and history[0]["kept_as"] == kept[0].name
    assert history[1]["action"] == "promote" and history[1]["version"] == 3
    # A sound alias is promoted as before, without any repair entry.
    code, _, err = cli("promote", "--repair", "net:1", "prod")
    assert code == 0 and not err
    assert [e["action"] for e in repo.alias_history("net", "prod")] == [
        "repair",
        "promote",
        "promote",
    ]


def test_rm_force_deletes_past_a_damaged_alias(repo, cli) -> None:
    _alias(repo).write_bytes(b"null")
    code, _, err = cli("rm", "-y", "--force", "net:1")
    assert code == 0, err
    assert repo.version_numbers("net") == [2, 3]


# --- damaged versions -----------------------------------------------------------------------
def _vfile(repo: ModelRepository, n: int, ext: str) -> Path:
    return repo.root / "models" / "net" / "versions" / f"{n:08d}.{ext}"


READ_COMMANDS = [
    ("ls",),
    ("ls", "net"),
    ("show", "net:2"),
    ("show", "net:2", "--tensors"),
    ("verify", "net:2"),
    ("verify",),
    ("search", "--metric", "acc=0:"),
    ("gc",),
]


def _not_hdf5(repo: ModelRepository) -> None:
    _vfile(repo, 2, "h5").write_bytes(b"hello, not hdf5")


def _empty(repo: ModelRepository) -> None:
    _vfile(repo, 2, "h5").write_bytes(b"")
    _vfile(repo, 2, "json").unlink()


def _h5_dir(repo: ModelRepository) -> None:
    _vfile(repo, 2, "h5").unlink()
    _vfile(repo, 2, "h5").mkdir()


def _sidecar_dir(repo: ModelRepository) -> None:
    _vfile(repo, 2, "json").unlink()
    _vfile(repo, 2, "json").mkdir()


def _sidecar_types(repo: ModelRepository) -> None:
    p = _vfile(repo, 2, "json")
    doc = json.loads(p.read_text())
    doc.update(
        metrics=[1, 2],
        tags="abc",
        contents=5,
        file_size="big",
        param_count="x",
        created=5,
        kind=3,
        dtypes=[1],
        created_ts="now",
        flops_per_sample="f",
    )
    p.write_text(json.dumps(doc))


def _sidecar_shards(repo: ModelRepository) -> None:
    p = _vfile(repo, 2, "json")
    doc = json.loads(p.read_text())
    doc.update(kind="sharded", shards=[{"rank": 0}, 5])
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage",
    [_not_hdf5, _empty, _h5_dir, _sidecar_dir, _sidecar_types, _sidecar_shards],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damaged_version_never_ends_in_a_traceback(repo, cli, damage) -> None:
    damage(repo)
    for args in READ_COMMANDS:
        code, _, err = cli(*args)
        assert code in (0, 6), (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (args, err)
    code, out, _ = cli("show", "net:3", "--json")  # the others are untouched
    assert code == 0 and json.loads(out)["ref"] == "net:3"


def test_sidecar_with_wrong_types_falls_back_to_the_file(repo) -> None:
    _sidecar_types(repo)
    v = repo.get("net:2")
    assert v.metrics == {"acc": 0.1} and v.kind == "model" and isinstance(v.tags, list)
    assert repo.verify("net:2").ok
    assert torch.equal(repo.load("net:2").state_dict["w"], torch.full((4,), 1.0))


# --- sharded versions cannot name files outside their shard directory -------------------
def _sharded(repo: ModelRepository) -> Path:
    for rank in range(2):
        repo.save_shard("big", {f"w{rank}": torch.ones(2)}, key="k1", rank=rank, world_size=2)
    v = repo.commit_shards("big", "k1", world_size=2)
    return repo.root / "models" / "big" / "versions" / f"{v.number:08d}.json"


def _rewrite_shard_file(sidecar: Path, file: str) -> None:
    doc = json.loads(sidecar.read_text())
    doc["shards"][1]["file"] = file
    sidecar.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "file",
    ["/etc/passwd", "../../../../outside.h5", "shards/k1/../../net/versions/00000001.h5"],
    ids=["absolute", "dotdot", "dotdot-inside"],
)
def test_shard_paths_outside_the_version_are_refused(repo, tmp_path: Path, file: str) -> None:
    sidecar = _sharded(repo)
    _rewrite_shard_file(sidecar, file)
    with pytest.raises(IntegrityError, match=r"big:1: shard path .* not inside"):
        repo.load("big:1")
    report = repo.verify("big:1")
    assert not report.ok and "shard path" in report.message


def test_shard_symlink_leading_out_is_refused(repo, tmp_path: Path) -> None:
    _sharded(repo)
    shard = repo.root / "models" / "big" / "shards" / "k1" / "rank-00001-of-00002.h5"
    outside = tmp_path / "outside.h5"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(IntegrityError, match=r"big:1: shard path .* leads out"):
        repo.load("big:1")


# --- model directories that are links out of the repository -----------------------------
def test_model_dir_symlinked_out_is_not_followed(repo, cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(repo.root / "models" / "net", elsewhere)
    link = repo.root / "models" / "evil"
    link.symlink_to(elsewhere)
    before = sorted(p.name for p in (elsewhere / "versions").iterdir())
    with pytest.raises(IntegrityError, match=r"model evil: .* leads out of the repository"):
        repo.save("evil", {"w": torch.zeros(1)})
    with pytest.raises(IntegrityError, match="model evil"):
        repo.save_shard("evil", {"w": torch.zeros(1)}, key="k", rank=0, world_size=1)
    assert sorted(p.name for p in (elsewhere / "versions").iterdir()) == before
    assert not (elsewhere / "shards").exists()
    with pytest.raises(IntegrityError, match="model evil"):
        repo.load("evil:1")
    for args in (("show", "evil:1"), ("ls",), ("ls", "evil"), ("gc",), ("promote", "evil:1", "x")):
        code, _, err = cli(*args)
        assert code == 6 and "model evil" in err and "leads out" in err, (args, err)
    assert os.path.islink(link) and (elsewhere / "versions" / "00000001.h5").exists()


def test_subdirectory_symlinked_out_is_not_followed(repo, tmp_path: Path) -> None:
    aliases = repo.root / "models" / "net" / "aliases"
    shutil.move(aliases, tmp_path / "aliases")
    aliases.symlink_to(tmp_path / "aliases")
    with pytest.raises(IntegrityError, match="leads out"):
        repo.aliases("net")
    with pytest.raises(IntegrityError, match="leads out"):
        repo.save("net", {"w": torch.zeros(1)})


def test_links_inside_the_repository_are_fine(repo) -> None:
    (repo.root / "models" / "alias-of-net").symlink_to(repo.root / "models" / "net")
    assert repo.latest("alias-of-net").number == 3
