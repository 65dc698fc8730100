"""Endpoint records and service tokens (files only; no server).

Specification: records are written atomically, found under a runs root at any depth the
spine uses, filtered by model ref and state; a service token is created once (mode 0600) even
when several replicas race, and a token file others could read is refused.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.serve.auth import (
    bearer_token,
    ensure_token,
    read_token,
    token_matches,
    token_path,
)
from aimass_hpc.serve.endpoints import (
    EndpointRecord,
    EndpointState,
    cluster_address,
    find_records,
    read_records,
    write_record,
)


def _record(run_dir: Path, ref: str, version: str, job: str, replica: int = 0) -> EndpointRecord:
    name = ref.split("@")[0].split(":")[0]
    return EndpointRecord(
        model_ref=ref,
        model_name=name,
        version=version,
        state=EndpointState.LOADING,
        job_id=job,
        replica=replica,
        run_dir=str(run_dir),
    )


def test_records_round_trip_and_state_changes(tmp_path: Path) -> None:
    rec = _record(tmp_path / "run", "mnist@prod", "3", "101")
    write_record(rec)
    write_record(rec, EndpointState.READY, host="10.0.0.5", port=8123, pid=42)
    (back,) = read_records(tmp_path / "run")
    assert back.state == "READY" and back.url == "http://10.0.0.5:8123"
    assert back.path().name == "101.0.json" and back.updated >= back.started
    with pytest.raises(ValueError):
        write_record(rec, "SLEEPING")
    with pytest.raises(AttributeError):
        write_record(rec, colour="blue")
    # No temp files are left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "run" / "endpoints").iterdir()) == ["101.0.json"]


def test_find_records_by_target_and_state(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    specs = [
        ("a", "mnist@prod", "3", "READY"),
        ("serve/b", "mnist@prod", "4", "LOADING"),  # one level deeper
        ("c", "mnist@staging", "4", "READY"),
        ("d", "cifar@prod", "1", "STOPPED"),
    ]
    for i, (sub, ref, version, state) in enumerate(specs):
        rec = _record(runs / sub, ref, version, str(100 + i))
        write_record(rec, state)
    (runs / "a" / "endpoints" / "junk.json").write_text("{not json")
    assert len(find_records(runs)) == 4
    assert [r.job_id for r in find_records(runs, "mnist@prod")] == ["100", "101"]
    assert [r.job_id for r in find_records(runs, "mnist@prod", ["READY"])] == ["100"]
    assert {r.job_id for r in find_records(runs, "mnist:4")} == {"101", "102"}
    assert {r.job_id for r in find_records(runs, "mnist")} == {"100", "101", "102"}
    assert find_records(runs, "cifar@prod", [EndpointState.READY]) == []


def test_cluster_address_is_not_the_wildcard() -> None:
    addr = cluster_address()
    assert addr and addr != "0.0.0.0"


def test_token_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(ensure_token(run))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 1 and len(tokens[0]) >= 40
    assert (token_path(run).stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in run.iterdir()) == ["serve.token"]
    assert ensure_token(run) == tokens[0]


def test_token_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "serve.token"
    path.write_text("secret\n")
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match="mode 644"):
        read_token(path)
    with pytest.raises(NotFoundError):
        read_token(tmp_path / "missing")


def test_token_comparison_and_header_parsing() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc") and not token_matches(None, "abc")
    assert not token_matches("ab", "abc") and not token_matches("é", "abc")
    assert bearer_token("Bearer xyz") == "xyz" and bearer_token("bearer  xyz ") == "xyz"
    assert bearer_token("Basic xyz") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None
