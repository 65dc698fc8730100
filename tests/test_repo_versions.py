"""References, version numbering, aliases (promote/rollback), search, delete and gc."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.repo import ModelRepository, Ref, parse_ref
from aimass_hpc.repo.layout import ModelDir


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def save(repo: ModelRepository, name: str = "m", **kw):  # noqa: ANN201
    return repo.save(name, {"w": torch.ones(2)}, **kw)


def test_parse_ref_forms_and_errors() -> None:
    assert parse_ref("net") == Ref("net")
    assert parse_ref("net:12") == Ref("net", version=12)
    assert parse_ref("net:latest") == Ref("net")
    assert parse_ref("net@prod") == Ref("net", alias="prod")
    assert parse_ref("net@latest") == Ref("net")
    assert str(parse_ref("a.b-c_d:3")) == "a.b-c_d:3"
    for bad in ("", "net:0", "net:x", "net:-1", ".hidden", "a/b", "net@", "-opt", "x" * 129):
        with pytest.raises(InputError):
            parse_ref(bad)


def test_repository_must_exist_unless_created(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no model repository at"):
        ModelRepository(tmp_path / "missing", create=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="non-empty directory"):
        ModelRepository(tmp_path / "full")
    with pytest.raises(NotFoundError, match="not a model repository"):
        ModelRepository(tmp_path / "full", create=False)
    ModelRepository(tmp_path / "new")
    assert ModelRepository(tmp_path / "new", create=False).names() == []


def test_versions_latest_and_unknown_refs(repo) -> None:
    assert [save(repo).number for _ in range(3)] == [1, 2, 3]
    assert repo.latest("m").number == 3
    assert repo.get("m").number == repo.get("m:latest").number == 3
    assert repo.version_numbers("m") == [1, 2, 3]
    assert repo.names() == ["m"]
    with pytest.raises(NotFoundError, match=r"model m has no version 7 \(latest is m:3\)"):
        repo.get("m:7")
    with pytest.raises(NotFoundError, match="unknown model 'other'"):
        repo.load("other")
    with pytest.raises(NotFoundError, match=r"no alias 'prod' \(aliases: none\)"):
        repo.get("m@prod")


def test_promote_rollback_and_history(repo) -> None:
    for _ in range(4):
        save(repo)
    repo.promote("m", 1, "prod")
    repo.promote("m", "m:2", "prod")
    repo.promote("m", "3", "prod")
    repo.promote("m", 4, "best")
    assert repo.aliases("m") == {"prod": 3, "best": 4}
    assert repo.get("m@prod").number == 3
    assert repo.rollback("m", "prod").number == 2
    assert repo.rollback("m", "prod").number == 1
    with pytest.raises(ConflictError, match="no previous target"):
        repo.rollback("m", "prod")
    history = repo.alias_history("m", "prod")
    assert [(e["action"], e["version"]) for e in history] == [
        ("promote", 1),
        ("promote", 2),
        ("promote", 3),
        ("rollback", 2),
        ("rollback", 1),
    ]
    assert all(e["user"] and e["at"] for e in history)
    repo.promote("m", "m@best", "prod")  # promote by alias: resolves to the number now
    assert repo.aliases("m")["prod"] == 4
    with pytest.raises(InputError, match="reserved"):
        repo.promote("m", 1, "latest")
    with pytest.raises(NotFoundError, match="no version 9"):
        repo.promote("m", 9, "prod")
    with pytest.raises(NotFoundError, match="no alias"):
        repo.rollback("m", "nope")


def test_delete_never_reuses_numbers_and_guards_aliases(repo) -> None:
    for _ in range(3):
        save(repo)
    repo.promote("m", 2, "prod")
    repo.promote("m", 3, "prod")
    with pytest.raises(InputError, match="say which version"):
        repo.delete("m")
    with pytest.raises(ConflictError, match="target of alias prod"):
        repo.delete("m:3")
    path = repo.get("m:1").path
    assert repo.delete("m:1").number == 1
    assert not path.exists() and repo.version_numbers("m") == [2, 3]
    assert save(repo).number == 4  # 1 is gone but never handed out again
    repo.delete("m@prod", force=True)
    with pytest.raises(NotFoundError, match="points to m:3, which was deleted"):
        repo.get("m@prod")
    assert repo.rollback("m", "prod").number == 2  # the alias history survives
    repo.delete("m:2", force=True)
    repo.promote("m", 4, "prod")
    with pytest.raises(ConflictError, match="previous target m:2 was deleted"):
        repo.rollback("m", "prod")
    with pytest.raises(NotFoundError):
        repo.delete("m:1")


def test_search_by_name_tags_metrics_flops_memory_and_date(repo) -> None:
    save(
        repo,
        "resnet18",
        metrics={"acc": 0.70},
        tags=["cv"],
        flops_per_sample=1.8e9,
        peak_memory_bytes=2 << 30,
    )
    save(
        repo,
        "resnet50",
        metrics={"acc": 0.76, "loss": 1.0},
        tags=["cv", "big"],
        flops_per_sample=4.1e9,
        peak_memory_bytes=6 << 30,
    )
    save(
        repo,
        "bert",
        metrics={"f1": 0.9},
        tags=["nlp"],
        flops_per_sample=2.2e10,
        peak_memory_bytes=12 << 30,
    )
    refs = lambda vs: [v.ref for v in vs]  # noqa: E731
    assert refs(repo.search("resnet*")) == ["resnet18:1", "resnet50:1"]
    assert refs(repo.search(tags=["cv", "big"])) == ["resnet50:1"]
    assert refs(repo.search(metrics={"acc": (0.75, None)})) == ["resnet50:1"]
    assert refs(repo.search(metrics={"acc": (None, 0.75)})) == ["resnet18:1"]
    assert refs(repo.search(flops=(1e9, 5e9))) == ["resnet18:1", "resnet50:1"]
    assert refs(repo.search(memory=(4 << 30, None))) == ["bert:1", "resnet50:1"]
    assert refs(repo.search(memory=(None, 8 << 30), flops=(3e9, None))) == ["resnet50:1"]
    now = datetime.now(UTC)
    assert len(repo.search(since=now - timedelta(hours=1))) == 3
    assert repo.search(since=now + timedelta(hours=1)) == []
    assert len(repo.search(until="2999-01-01", since="1h")) == 3
    assert repo.search(until=time.time() - 3600) == []
    with pytest.raises(InputError, match="invalid since"):
        repo.search(since="yesterday-ish")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_gc_removes_leftovers_of_dead_writers_only(repo) -> None:
    save(repo)
    md = ModelDir(repo.root, "m")

    # A crashed writer (dead pid on this host) left a claim, a temp file and a sidecar.
    md.claim(2).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    (md.versions / ".00000002.h5.tmp-1-aa").write_bytes(b"x" * 100)
    (md.versions / "00000002.json").write_text("{}")
    (md.versions / ".00000001.h5.deleted-1-bb").write_bytes(b"y" * 10)
    # A live writer (this process) is busy with number 3: keep its files.
    md.claim(3).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    (md.versions / ".00000003.h5.tmp-2-cc").write_bytes(b"z")
    # Staged shards nobody committed, from long ago.
    stale = md.shards / "old-key"
    stale.mkdir(parents=True)
    (stale / "rank-00000-of-00001.h5").write_bytes(b"s" * 50)
    os.utime(stale / "rank-00000-of-00001.h5", (0, 0))
    os.utime(stale, (0, 0))

    dry = repo.gc(dry_run=True)
    assert len(dry.removed) == 4 and (md.versions / "00000002.json").exists()
    report = repo.gc()
    names = sorted(Path(p).name for p in report.removed)
    assert names == [
        ".00000001.h5.deleted-1-bb",
        ".00000002.h5.tmp-1-aa",
        "00000002.json",
        "old-key",
    ]
    assert report.bytes_freed == 100 + 2 + 10 + 50
    assert [Path(p).name for p in report.kept_in_progress] == [".00000003.h5.tmp-2-cc"]
    assert repo.version_numbers("m") == [1] and repo.load("m:1").state_dict["w"].sum() == 2
    assert save(repo).number == 4  # claims are kept: 2 and 3 stay used
