"""The search journal: an append-only, lock-protected JSON-lines log safe on shared filesystems."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from aimass_hpc.common.errors import ConflictError, IntegrityError
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.journal import FileLock, Journal, read_lock_holder, replay

# --------------------------------------------------------------------------------------------
# helpers run in child processes (module level so they pickle under any start method)


def _append_many(path: str, writer: int, n: int) -> None:
    jr = Journal(path)
    for i in range(n):
        jr.append(J.TRIAL_PROPOSED, trial=f"{writer}-{i}", params={"writer": writer, "i": i})


def _increment(lock_path: str, counter: str, n: int) -> None:
    # read-modify-write of a counter: lost updates would show if two processes held the lock
    for _ in range(n):
        with FileLock(lock_path, stale_after=30.0, timeout=60.0):
            value = int(Path(counter).read_text())
            Path(counter).write_text(str(value + 1))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(path: Path, *, host: str, pid: int, age: float = 0.0, token: str = "t0") -> None:
    payload = {"host": host, "pid": pid, "start": None, "time": time.time() - age, "token": token}
    path.write_text(json.dumps(payload))
    if age:
        past = time.time() - age
        os.utime(path, (past, past))


# --------------------------------------------------------------------------------------------
# appending and reading


def test_records_round_trip_with_sequence_numbers(tmp_path: Path) -> None:
    jr = Journal(tmp_path / "journal.jsonl")
    jr.append(J.SEARCH_CREATED, spec={"search": {"name": "q"}})
    jr.append_many(
        [
            {"type": J.TRIAL_PROPOSED, "trial": 0, "params": {"x": 1.5}},
            {"type": J.TRIAL_PROPOSED, "trial": 1, "params": {"x": -2.0}},
        ]
    )
    recs = Journal(tmp_path / "journal.jsonl").records()
    assert [r["seq"] for r in recs] == [0, 1, 2]
    assert [r["type"] for r in recs] == [J.SEARCH_CREATED, J.TRIAL_PROPOSED, J.TRIAL_PROPOSED]
    assert recs[2]["params"] == {"x": -2.0}
    assert all(isinstance(r["time"], float) for r in recs)
    assert not (tmp_path / "journal.jsonl.lock").exists()


def test_unknown_record_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown journal record type"):
        Journal(tmp_path / "j.jsonl").append("trial_exploded", trial=1)


def test_a_caller_cannot_choose_the_sequence_number(tmp_path: Path) -> None:
    jr = Journal(tmp_path / "j.jsonl")
    rec = jr.append(J.SEARCH_CREATED, spec={}, seq=99)
    assert rec["seq"] == 0


def test_torn_last_line_is_skipped_and_the_next_append_starts_a_fresh_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    jr = Journal(path)
    jr.append(J.SEARCH_CREATED, spec={})
    jr.append(J.TRIAL_PROPOSED, trial=0, params={"x": 1})
    # a writer killed mid-write leaves half a record and no newline
    with open(path, "ab") as fh:
        fh.write(b'{"type": "trial_finished", "trial": 0, "val')
    fresh = Journal(path)
    assert [r["type"] for r in fresh.records()] == [J.SEARCH_CREATED, J.TRIAL_PROPOSED]
    fresh.append(J.TRIAL_FAILED, trial=0, reason="boom")
    recs = Journal(path).records()
    assert [r["type"] for r in recs] == [J.SEARCH_CREATED, J.TRIAL_PROPOSED, J.TRIAL_FAILED]
    assert recs[-1]["seq"] == 2
    assert path.read_bytes().endswith(b"\n")


def test_incremental_reader_sees_records_appended_by_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    reader, writer = Journal(path), Journal(path)
    assert reader.records() == []
    writer.append(J.SEARCH_CREATED, spec={})
    assert len(reader.records()) == 1
    writer.append(J.TRIAL_PROPOSED, trial=0, params={})
    assert [r["seq"] for r in reader.records()] == [0, 1]
    # the reader, appending, continues the numbering the other writer left
    assert reader.append(J.CANCEL_REQUESTED)["seq"] == 2


def test_concurrent_writer_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.jsonl")
    writers, per_writer = 4, 40
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, per_writer)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = Path(path).read_text().splitlines()
    assert len(lines) == writers * per_writer
    recs = [json.loads(line) for line in lines]  # every line is a whole record
    assert sorted(r["seq"] for r in recs) == list(range(writers * per_writer))
    assert len({r["trial"] for r in recs}) == writers * per_writer
    for w in range(writers):  # each writer's records keep their order
        mine = [r["params"]["i"] for r in recs if r["params"]["writer"] == w]
        assert mine == list(range(per_writer))


# --------------------------------------------------------------------------------------------
# the lock file


def test_lock_file_names_its_holder(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock", purpose="testing")
    with lock:
        holder = read_lock_holder(tmp_path / "x.lock")
        assert holder is not None
        assert holder.pid == os.getpid()
        assert holder.purpose == "testing"
        assert lock.held
    assert not lock.held
    assert not (tmp_path / "x.lock").exists()


def test_a_live_holder_on_this_host_is_waited_for_not_broken(tmp_path: Path) -> None:
    first = FileLock(tmp_path / "x.lock", stale_after=0.05)
    first.acquire()
    time.sleep(0.1)  # older than stale_after, but its pid is alive here
    with pytest.raises(ConflictError, match=f"pid {os.getpid()}"):
        FileLock(tmp_path / "x.lock", stale_after=0.05, timeout=0.3).acquire()
    first.release()


def test_lock_of_a_dead_process_on_this_host_is_broken_at_once(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    _write_lock(lock_path, host=J._HOST, pid=_dead_pid())
    lock = FileLock(lock_path, stale_after=3600, timeout=5)
    lock.acquire()
    assert read_lock_holder(lock_path).pid == os.getpid()
    lock.release()


def test_killed_journal_writer_does_not_block_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    Journal(path).append(J.SEARCH_CREATED, spec={})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from aimass_hpc.launch.journal import Journal\n"
            "jr = Journal(sys.argv[1])\n"
            "jr.lock.acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert (tmp_path / "journal.jsonl.lock").exists()
        # stale_after is long: only the dead pid makes the lock breakable
        jr = Journal(path, lock_stale_after=3600, lock_timeout=10)
        jr.append(J.TRIAL_PROPOSED, trial=0, params={})
        assert [r["seq"] for r in Journal(path).records()] == [0, 1]
        assert not (tmp_path / "journal.jsonl.lock").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_foreign_host_lock_is_broken_only_when_old(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    _write_lock(lock_path, host="some-other-node", pid=12345, age=0.0)
    with pytest.raises(ConflictError, match="some-other-node"):
        FileLock(lock_path, stale_after=30.0, timeout=0.2).acquire()
    _write_lock(lock_path, host="some-other-node", pid=12345, age=120.0)
    lock = FileLock(lock_path, stale_after=30.0, timeout=5)
    lock.acquire()
    assert read_lock_holder(lock_path).host == J._HOST
    lock.release()


def test_foreign_lock_that_stops_changing_is_stale_even_with_a_skewed_clock(
    tmp_path: Path,
) -> None:
    # the other host's clock runs ahead: mtime in the future; watching it not change still works
    lock_path = tmp_path / "x.lock"
    _write_lock(lock_path, host="fast-clock-node", pid=1)
    future = time.time() + 3600
    os.utime(lock_path, (future, future))
    lock = FileLock(lock_path, stale_after=0.3, timeout=10)
    lock.acquire()
    lock.release()


def test_an_empty_lock_file_left_by_a_crash_is_broken_when_old(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    lock_path.write_text("")
    past = time.time() - 120
    os.utime(lock_path, (past, past))
    with FileLock(lock_path, stale_after=30.0, timeout=5):
        pass


def test_heartbeat_keeps_a_long_holder_fresh_and_detects_takeover(tmp_path: Path) -> None:
    lock_path = tmp_path / "driver.lock"
    lock = FileLock(lock_path)
    lock.acquire()
    past = time.time() - 1000
    os.utime(lock_path, (past, past))
    lock.refresh()
    assert time.time() - lock_path.stat().st_mtime < 60
    # someone broke and took it: refresh says so, release leaves the new holder's file alone
    _write_lock(lock_path, host="other", pid=1, token="someone-else")
    with pytest.raises(ConflictError, match="taken over"):
        lock.refresh()
    lock2 = FileLock(lock_path)
    lock2._token = "mine"  # simulate holding a lock that was taken over
    lock2.release()
    assert read_lock_holder(lock_path).token == "someone-else"


def test_a_takeover_marker_left_by_a_dead_breaker_expires(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    _write_lock(lock_path, host=J._HOST, pid=_dead_pid())
    marker = tmp_path / "x.lock.takeover"
    marker.write_text("")
    past = time.time() - 3600
    os.utime(marker, (past, past))
    with FileLock(lock_path, timeout=10):
        pass
    assert not marker.exists()


def test_many_processes_breaking_one_stale_lock_still_exclude_each_other(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    counter = tmp_path / "counter"
    counter.write_text("0")
    _write_lock(lock_path, host=J._HOST, pid=_dead_pid())
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_increment, args=(str(lock_path), str(counter), 25)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert int(counter.read_text()) == 100
    assert not lock_path.exists()
    assert not list(tmp_path.glob("*.released"))


# --------------------------------------------------------------------------------------------
# replay


def _journal(tmp_path: Path, records: list[dict]) -> list[dict]:
    jr = Journal(tmp_path / "journal.jsonl")
    jr.append_many(records)
    return jr.records()


def test_replay_rebuilds_every_trial_state(tmp_path: Path) -> None:
    recs = _journal(
        tmp_path,
        [
            {"type": J.SEARCH_CREATED, "spec": {"search": {"name": "q"}}},
            {"type": J.DRIVER_STARTED, "host": "h", "pid": 1},
            {"type": J.TRIAL_PROPOSED, "trial": 0, "params": {"x": 0.5}},
            {"type": J.TRIAL_SUBMITTED, "trial": 0, "job_id": "11", "run_dir": "/r/0"},
            {"type": J.TRIAL_RUNNING, "trial": 0, "job_id": "11", "started_at": 100.0},
            {"type": J.TRIAL_FINISHED, "trial": 0, "value": 0.25, "ended_at": 130.0},
            {"type": J.TRIAL_PROPOSED, "trial": 1, "params": {"x": 3.0}},
            {"type": J.TRIAL_SUBMITTED, "trial": 1, "job_id": "12", "run_dir": "/r/1"},
            {"type": J.TRIAL_FAILED, "trial": 1, "reason": "exit code 1"},
            {"type": J.TRIAL_PROPOSED, "trial": 2, "params": {"x": 1.0}},
            {"type": J.TRIAL_SUBMITTED, "trial": 2, "job_id": "13", "run_dir": "/r/2a"},
            {"type": J.TRIAL_LOST, "trial": 2, "job_id": "13", "reason": "job vanished"},
            {"type": J.TRIAL_SUBMITTED, "trial": 2, "job_id": "14", "run_dir": "/r/2b"},
            {"type": J.TRIAL_PROPOSED, "trial": 3, "params": {"x": 2.0}},
            {"type": J.TRIAL_PROPOSED, "trial": 4, "params": {"x": 4.0}},
            {"type": J.TRIAL_SUBMITTED, "trial": 4, "job_id": "15", "run_dir": "/r/4"},
            {"type": J.TRIAL_PRUNED, "trial": 4, "value": 9.0, "step": 3},
        ],
    )
    st = replay(recs)
    assert st.spec == {"search": {"name": "q"}}
    assert st.n_proposed == 5
    assert [t.state for t in st.trials.values()] == [
        J.FINISHED,
        J.FAILED,
        J.SUBMITTED,
        J.PROPOSED,
        J.PRUNED,
    ]
    t0, t1, t2, t3, t4 = st.trials.values()
    assert t0.value == 0.25 and t0.duration == 30.0
    assert t1.reason == "exit code 1"
    assert (t2.attempts, t2.job_id, t2.job_ids, t2.run_dir) == (2, "14", ["13", "14"], "/r/2b")
    assert t3.job_id is None
    assert t4.pruned_step == 3 and t4.value == 9.0
    assert [t.id for t in st.active] == [2, 3]
    assert st.best_trial("minimize").id == 0
    assert st.last_seq == len(recs) - 1
    assert not st.finished


def test_first_terminal_record_wins_and_duplicates_are_ignored(tmp_path: Path) -> None:
    recs = _journal(
        tmp_path,
        [
            {"type": J.TRIAL_PROPOSED, "trial": 7, "params": {"x": 1}},
            {"type": J.TRIAL_PROPOSED, "trial": 7, "params": {"x": 999}},
            {"type": J.TRIAL_SUBMITTED, "trial": 7, "job_id": "1", "run_dir": "/r"},
            {"type": J.TRIAL_FINISHED, "trial": 7, "value": 1.0},
            {"type": J.TRIAL_FAILED, "trial": 7, "reason": "late orphan"},
            {"type": J.TRIAL_FINISHED, "trial": 7, "value": 5.0},
        ],
    )
    st = replay(recs)
    assert st.n_proposed == 1
    t = st.trials[7]
    assert (t.params, t.state, t.value, t.reason) == ({"x": 1}, J.FINISHED, 1.0, None)
    with pytest.raises(ConflictError):
        J.ensure_new_trial_id(st, 7)


def test_best_trial_follows_the_direction(tmp_path: Path) -> None:
    recs = [{"type": J.TRIAL_PROPOSED, "trial": i, "params": {}} for i in range(3)]
    recs += [{"type": J.TRIAL_FINISHED, "trial": i, "value": v} for i, v in enumerate([2, 1, 3])]
    st = replay(_journal(tmp_path, recs))
    assert st.best_trial("minimize").id == 1
    assert st.best_trial("maximize").id == 2


def test_replay_refuses_a_record_for_an_unknown_trial() -> None:
    with pytest.raises(IntegrityError, match="unknown trial 5"):
        replay([{"type": J.TRIAL_FINISHED, "trial": 5, "value": 1.0, "seq": 0}])


def test_search_finished_and_cancel_are_replayed(tmp_path: Path) -> None:
    recs = _journal(
        tmp_path,
        [
            {"type": J.SEARCH_CREATED, "spec": {}},
            {"type": J.CANCEL_REQUESTED, "by": "me"},
            {"type": J.MODEL_PROMOTED, "model": "m", "version": 3, "alias": "best"},
            {"type": J.SEARCH_FINISHED, "best": {"trial": 0, "value": 1.0}},
        ],
    )
    st = replay(recs)
    assert st.cancel_requested and st.finished
    assert st.best == {"trial": 0, "value": 1.0}
    assert st.promoted["version"] == 3


# --------------------------------------------------------------------------------------------
# damage: what a crash leaves is tolerated (and said); anything else names the file and line


def _three_records(path: Path) -> list[bytes]:
    jr = Journal(path)
    jr.append(J.SEARCH_CREATED, spec={})
    jr.append(J.TRIAL_PROPOSED, trial=0, params={"x": 1})
    jr.append(J.TRIAL_PROPOSED, trial=1, params={"x": 2})
    return path.read_bytes().splitlines(keepends=True)


def test_an_incomplete_last_line_is_tolerated_and_said(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"".join(lines) + b'{"seq": 3, "type": "trial_fin')
    jr = Journal(path)
    assert len(jr.records()) == 3
    (note,) = jr.notes()
    assert f"journal {path} line 4: ignoring an incomplete last line (29 bytes)" in note
    path.write_bytes(b"".join(lines) + b"\x00" * 100)  # the zeros a crash may leave
    assert len(Journal(path).records()) == 3


def test_a_torn_fragment_ended_by_the_next_writer_is_skipped_and_said(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _three_records(path)
    with open(path, "ab") as fh:
        fh.write(b'{"seq": 3, "trial": 0, "ty')
    Journal(path).append(J.TRIAL_FAILED, trial=0, reason="boom")  # ends the torn line first
    jr = Journal(path)
    assert [r["seq"] for r in jr.records()] == [0, 1, 2, 3]
    assert jr.notes() == [f"journal {path} line 4: skipped a torn record"]


def test_a_torn_complete_last_line_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"".join(lines) + b'{"seq": 3, "ty\n')
    jr = Journal(path)
    assert len(jr.records()) == 3
    assert jr.notes() == [f"journal {path} line 4: skipped an unreadable last line (a torn record)"]


@pytest.mark.parametrize(
    ("damage", "line", "message"),
    [
        (lambda ls: ls.insert(1, b"[1, 2]\n"), 2, "a JSON array, not a record"),
        (lambda ls: ls.insert(1, b"42\n"), 2, "a JSON integer, not a record"),
        (lambda ls: ls.insert(1, b"hello\n"), 2, "not a journal record"),
        (lambda ls: ls.__setitem__(1, ls[1][:9] + b"\xff" + ls[1][9:]), 2, "not UTF-8"),
        (lambda ls: ls.__setitem__(1, ls[1][:20] + b"\n"), 2, "record 1 is lost with it"),
        (lambda ls: ls.__delitem__(1), 2, "record seq 2 where 1 was due"),
        (
            lambda ls: ls.__setitem__(1, ls[1].replace(b'"trial": 0', b'"trial": [0]')),
            2,
            "'trial' of a trial_proposed record is an array",
        ),
        (
            lambda ls: ls.__setitem__(1, ls[1].replace(b'"seq": 1', b'"seq": "1"')),
            2,
            "'seq' is a string",
        ),
        (
            lambda ls: ls.__setitem__(1, ls[1].replace(b'{"x": 1}', b"[1]")),
            2,
            "'params' of a trial_proposed record is an array",
        ),
        (
            lambda ls: ls.__setitem__(0, ls[0].replace(b'"spec": {}', b'"spec": "x"')),
            1,
            "'spec' of a search_created record is a string",
        ),
        (
            lambda ls: ls.__setitem__(2, ls[2].replace(b'"trial_proposed"', b'"trial_exploded"')),
            3,
            "unknown record type 'trial_exploded'",
        ),
    ],
    ids=[
        "array",
        "number",
        "not-json",
        "non-utf8",
        "garbled-middle",
        "deleted-middle",
        "trial-list",
        "seq-string",
        "params-list",
        "spec-string",
        "unknown-type",
    ],
)
def test_a_damaged_journal_names_the_file_and_line(
    tmp_path: Path, damage: Any, line: int, message: str
) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _three_records(path)
    damage(lines)
    path.write_bytes(b"".join(lines))
    with pytest.raises(IntegrityError) as info:
        Journal(path).records()
    assert str(info.value).startswith(f"journal {path} line {line}: "), str(info.value)
    assert message in str(info.value)
    before = path.read_bytes()
    with pytest.raises(IntegrityError):  # a writer refuses to build on a damaged journal
        Journal(path).append(J.CANCEL_REQUESTED)
    assert path.read_bytes() == before


def test_replay_refuses_fields_of_the_wrong_type() -> None:
    good = {"type": J.TRIAL_PROPOSED, "trial": 0, "params": {}, "seq": 0}
    for bad in (
        {"trial": [0]},
        {"params": [1]},
        {"time": "noon"},
        {"seq": True},
        {"type": 7},
    ):
        with pytest.raises(IntegrityError, match="^journal record "):
            replay([{**good, **bad}])
    finished = {"type": J.TRIAL_FINISHED, "trial": 0, "value": "0.5", "seq": 1}
    with pytest.raises(IntegrityError, match="'value' of a trial_finished record is a string"):
        replay([good, finished])
    with pytest.raises(IntegrityError, match="not a record"):
        replay([good, [1, 2]])  # type: ignore[list-item]


def test_an_incremental_reader_decides_about_an_unreadable_line_when_a_record_follows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"".join(lines) + b'{"seq": 3, "ty\n')
    reader = Journal(path)
    assert len(reader.records()) == 3 and "unreadable last line" in reader.notes()[0]
    Journal(path).append(J.CANCEL_REQUESTED)  # seq 3: nothing was lost, the line was torn
    assert [r["seq"] for r in reader.records()] == [0, 1, 2, 3]
    assert reader.notes() == [f"journal {path} line 4: skipped a torn record"]
    with open(path, "ab") as fh:  # now a record goes missing after an unreadable line
        fh.write(b'{"seq": 4, "ty\n' + lines[0].replace(b'"seq": 0', b'"seq": 5'))
    with pytest.raises(IntegrityError, match=f"^journal {path} line 6: unreadable"):
        reader.records()


# --------------------------------------------------------------------------------------------
# the incremental state (what the driver keeps between polls)

_TRIAL_KINDS = [
    J.TRIAL_SUBMITTED,
    J.TRIAL_RUNNING,
    J.TRIAL_LOST,
    J.TRIAL_FINISHED,
    J.TRIAL_FAILED,
    J.TRIAL_PRUNED,
    J.TRIAL_CANCELLED,
]


def _random_records(draw_int: Any, n: int) -> list[dict[str, Any]]:
    """``n`` valid records in a plausible but adversarial order: repeated proposals, late
    terminal records, running records for an old job, ties and infinities in values, and now
    and then a record for a trial never proposed (damage both readers must report)."""
    out: list[dict[str, Any]] = [{"type": J.SEARCH_CREATED, "spec": {"search": {}}}]
    trials: list[int] = []
    values = [0.0, -0.0, 1.0, 1.0, 2.5, -3.0, float("inf"), float("-inf")]
    for _ in range(n):
        roll = draw_int(0, 19)
        if not trials or roll < 4:
            tid = draw_int(0, len(trials) + 1)  # sometimes one proposed already
            trials.append(tid)
            out.append({"type": J.TRIAL_PROPOSED, "trial": tid, "params": {"x": roll}})
            continue
        if roll == 4:
            kind = [J.CANCEL_REQUESTED, J.DRIVER_STARTED, J.SEARCH_FINISHED][draw_int(0, 2)]
            out.append(
                {"type": kind, "best": None} if kind == J.SEARCH_FINISHED else {"type": kind}
            )
            continue
        tid = trials[draw_int(0, len(trials) - 1)] if draw_int(0, 40) else 999  # 999: unknown
        kind = _TRIAL_KINDS[draw_int(0, len(_TRIAL_KINDS) - 1)]
        rec: dict[str, Any] = {"type": kind, "trial": tid, "job_id": str(draw_int(1, 3))}
        if kind == J.TRIAL_FINISHED:
            rec["value"] = values[draw_int(0, len(values) - 1)]
        out.append(rec)
    return out


def _same_state(kept: J.SearchState, full: J.SearchState) -> None:
    assert kept == full  # every public field, every trial
    for states in ([J.SUBMITTED, J.RUNNING], [J.LOST], [J.PROPOSED], [J.RUNNING], [J.FINISHED]):
        assert [t.id for t in kept.by_state(*states)] == [t.id for t in full.by_state(*states)]
    assert [t.id for t in kept.active] == [
        t.id for t in full.trials.values() if t.state in J.ACTIVE_STATES
    ]
    for direction, sign in (("minimize", 1.0), ("maximize", -1.0)):
        done = [t for t in full.trials.values() if t.state == J.FINISHED and t.value is not None]
        want = min(done, key=lambda t: sign * float(t.value)) if done else None  # the old scan
        got = kept.best_trial(direction)
        assert (got.id if got else None) == (want.id if want else None)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=hst.data())
def test_the_kept_state_after_each_append_equals_a_full_replay(tmp_path: Path, data: Any) -> None:
    def draw_int(lo: int, hi: int) -> int:
        return data.draw(hst.integers(lo, hi))

    path = tmp_path / f"journal-{os.urandom(4).hex()}.jsonl"
    records = _random_records(draw_int, data.draw(hst.integers(1, 40)))
    writer, reader = Journal(path), Journal(path)
    done = 0
    while done < len(records):
        batch = draw_int(1, 5)  # one locked write may carry several records
        writer.append_many(records[done : done + batch])
        done += batch
        try:
            full = replay(Journal(path).records())
        except IntegrityError as exc:  # a record names a trial never proposed
            with pytest.raises(IntegrityError) as kept:
                reader.state()
            assert str(kept.value) == str(exc)
            with pytest.raises(IntegrityError):  # and it says so on every later poll
                reader.state()
            return
        _same_state(reader.state(), full)


def test_a_poll_with_no_new_bytes_parses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    writer, reader = Journal(path), Journal(path)
    writer.append(J.SEARCH_CREATED, spec={})
    writer.append_many(
        [{"type": J.TRIAL_PROPOSED, "trial": i, "params": {"x": i}} for i in range(50)]
    )
    state = reader.state()
    assert reader.parsed_lines == 51
    assert reader.state() is state and reader.parsed_lines == 51  # nothing new: nothing parsed
    writer.append(J.TRIAL_SUBMITTED, trial=7, job_id="42")
    assert reader.state() is state and reader.parsed_lines == 52  # only the new line
    assert state.trials[7].state == J.SUBMITTED and state.trials[7].job_id == "42"
    # a torn tail (a writer died mid-record) is read once, not re-parsed every poll
    with open(path, "ab") as fh:
        fh.write(b'{"seq": 52, "type": "trial_fin')
    reader.state()
    parsed = reader.parsed_lines
    for _ in range(3):
        reader.state()
    assert reader.parsed_lines == parsed
    assert "incomplete last line" in reader.notes()[-1]


def test_the_kept_state_keeps_the_torn_tail_guarantees(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    lines = _three_records(path)
    path.write_bytes(b"".join(lines) + b'{"seq": 3, "ty\n')  # an unreadable (torn) last line
    reader = Journal(path)
    assert reader.state().last_seq == 2 and "unreadable last line" in reader.notes()[0]
    Journal(path).append(J.CANCEL_REQUESTED)  # seq 3: nothing lost, the line was torn
    assert reader.state().cancel_requested and reader.state().last_seq == 3
    assert reader.notes() == [f"journal {path} line 4: skipped a torn record"]
    with open(path, "ab") as fh:  # now a record goes missing after an unreadable line
        fh.write(b'{"seq": 4, "ty\n' + lines[0].replace(b'"seq": 0', b'"seq": 5'))
    for _ in range(2):  # every later poll says the same
        with pytest.raises(IntegrityError, match=f"^journal {path} line 6: unreadable"):
            reader.state()


def test_the_kept_best_trial_breaks_ties_by_proposal_order(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    reader, writer = Journal(path), Journal(path)
    writer.append_many([{"type": J.TRIAL_PROPOSED, "trial": i, "params": {}} for i in range(3)])
    writer.append(J.TRIAL_FINISHED, trial=2, value=1.0)
    assert reader.state().best_trial("minimize").id == 2
    writer.append(J.TRIAL_FINISHED, trial=1, value=1.0)  # a tie: the earlier proposal wins
    writer.append(J.TRIAL_FINISHED, trial=0, value=5.0)
    state = reader.state()
    assert state.best_trial("minimize").id == 1 and state.best_trial("maximize").id == 0
    assert replay(writer.records()).best_trial("minimize").id == 1  # as a full replay says
