"""What one search-driver poll costs in journal reading, against the number of trials.

No cluster needed. Builds journals of N finished trials (search_created, then per trial
trial_proposed / trial_submitted / trial_running / trial_finished, as the driver writes them)
through the Journal API in a temp dir, appends one new record, then times bringing the state
up to date:

  full replay   the old driver: ``replay(journal.records())`` -- every record applied again
                (its Journal handle already read incrementally; the replay was the cost)
  incremental   the driver now: ``journal.state()`` -- reads the appended bytes, applies the
                one new record to the kept SearchState

The old driver did that up to five times per poll (loop top, reconcile, prune, fill, end
check), the new one five cheap calls; both columns are shown per call and per poll.

    .venv/bin/python benchmarks/bench_search_state.py [--trials 100 1000 10000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from aimass_hpc.launch import journal as J  # noqa: E402

CALLS_PER_POLL = 5  # state() calls per driver poll (loop, reconcile, prune, fill, end check)

SPEC = {  # the shape of a resolved search spec record (search_created carries it)
    "search": {
        "name": "bench",
        "sampler": "mcts",
        "seed": 12345,
        "budget": 10000,
        "parallel": 16,
        "metric": "val_loss",
        "direction": "minimize",
        "poll_interval": 30.0,
        "max_attempts": 3,
    },
    "objective": {"kind": "train", "train_spec": "/shared/specs/train.toml", "env": {}},
    "space": {
        "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
        "batch_size": {"type": "int", "low": 16, "high": 256},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "optimizer": {"type": "categorical", "choices": ["adam", "adamw", "sgd"]},
    },
    "trial": {"nodes": 1, "ntasks_per_node": 4, "gpus_per_node": 4, "time": "02:00:00"},
}


def _trial_records(tid: int, root: Path) -> list[dict]:
    """The four records a finished trial leaves in the journal."""
    job = str(100000 + tid)
    run_dir = str(root / "trials" / f"20261204-120000-bench-t{tid:05d}-{tid:06x}")
    now = 1_765_000_000.0 + tid * 60
    return [
        {
            "type": J.TRIAL_PROPOSED,
            "trial": tid,
            "params": {
                "lr": 10 ** (-5 + 4 * ((tid * 7919) % 1000) / 1000),
                "batch_size": 16 + (tid * 31) % 240,
                "dropout": ((tid * 17) % 50) / 100,
                "optimizer": ["adam", "adamw", "sgd"][tid % 3],
            },
        },
        {"type": J.TRIAL_SUBMITTED, "trial": tid, "job_id": job, "run_dir": run_dir, "attempt": 1},
        {"type": J.TRIAL_RUNNING, "trial": tid, "job_id": job, "started_at": now + 20},
        {
            "type": J.TRIAL_FINISHED,
            "trial": tid,
            "value": 0.1 + ((tid * 104729) % 10007) / 10007,
            "source": "result.json:val_loss",
            "started_at": now + 20,
            "ended_at": now + 3600,
        },
    ]


def build_journal(directory: Path, n_trials: int) -> Path:
    """A journal of ``n_trials`` finished trials written through :class:`Journal`."""
    path = directory / J.JOURNAL_NAME
    journal = J.Journal(path)
    journal.append(J.SEARCH_CREATED, spec=SPEC, name="bench", site="bench", host="login1")
    journal.append(J.DRIVER_STARTED, host="login1", pid=4242, job_id=None, resumed=False)
    batch: list[dict] = []
    for tid in range(n_trials):
        batch += _trial_records(tid, directory)
        if len(batch) >= 400:  # one locked, fsynced write per 100 trials
            journal.append_many(batch)
            batch = []
    if batch:
        journal.append_many(batch)
    return path


def _median(fn: Callable[[], object], setup: Callable[[], None], repeat: int) -> float:
    """Median seconds of ``fn()``, each run after an untimed ``setup()``."""
    samples = []
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(n_trials: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-search-state-") as tmp:
        path = build_journal(Path(tmp), n_trials)
        writer = J.Journal(path)  # another process's handle: `aimass search cancel`, say
        old = J.Journal(path)  # the old driver's handle (incremental reads, full replays)
        new = J.Journal(path)  # the new driver's handle (kept state)
        old.records()
        new.state()  # both drivers have read the journal once, at start

        def append_one() -> None:
            writer.append(J.DRIVER_STARTED, host="login1", pid=4243, job_id=None, resumed=True)

        full_call = _median(lambda: J.replay(old.records()), append_one, repeat)
        inc_call = _median(new.state, append_one, repeat)
        full_poll = _median(
            lambda: [J.replay(old.records()) for _ in range(CALLS_PER_POLL)], append_one, repeat
        )
        inc_poll = _median(lambda: [new.state() for _ in range(CALLS_PER_POLL)], append_one, repeat)
        # a poll where nothing was appended: the common case between trial events
        idle_poll = _median(
            lambda: [new.state() for _ in range(CALLS_PER_POLL)], lambda: None, repeat
        )
        assert new.state() == J.replay(J.Journal(path).records())  # same answer both ways
        return {
            "records": len(new.records()),
            "kib": path.stat().st_size / 1024,
            "full_call": full_call,
            "inc_call": inc_call,
            "full_poll": full_poll,
            "inc_poll": inc_poll,
            "idle_poll": idle_poll,
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    table = Table(title="journal -> search state: full replay (old driver) vs incremental (new)")
    columns = [
        "trials",
        "records",
        "journal KiB",
        "1 call: replay ms",
        "1 call: incremental ms",
        "ratio",
        f"poll ({CALLS_PER_POLL} calls): old ms",
        f"poll ({CALLS_PER_POLL} calls): new ms",
        "poll ratio",
        "idle poll: new ms",
    ]
    for name in columns:
        table.add_column(name, justify="right")
    for n in args.trials:
        r = measure(n, args.repeat)
        table.add_row(
            f"{n:,}",
            f"{r['records']:,}",
            f"{r['kib']:,.0f}",
            _ms(r["full_call"]),
            _ms(r["inc_call"]),
            f"{r['full_call'] / r['inc_call']:,.0f}x",
            _ms(r["full_poll"]),
            _ms(r["inc_poll"]),
            f"{r['full_poll'] / r['inc_poll']:,.0f}x",
            _ms(r["idle_poll"]),
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
