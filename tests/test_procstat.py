"""Process facts from /proc: start ticks (pid reuse), state (zombies), age (start-up time)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from aimass_hpc.common import procstat


def test_a_childs_age_state_and_start_ticks() -> None:
    before = time.monotonic()
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.3)
        age = procstat.age_s(child.pid)
        assert age is not None and 0.2 <= age <= time.monotonic() - before + 0.02
        assert procstat.state(child.pid) in ("S", "R")
        ticks = procstat.start_ticks(child.pid)
        assert ticks is not None and ticks == procstat.start_ticks(child.pid)
        assert ticks >= procstat.start_ticks(os.getpid())  # started after this process
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while procstat.state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procstat.state(child.pid) == "Z"  # dead, not reaped yet
    finally:
        child.kill()
        child.wait()
    assert procstat.state(child.pid) is None
    assert procstat.start_ticks(child.pid) is None and procstat.age_s(child.pid) is None


def test_this_process_is_older_than_its_child() -> None:
    age = procstat.age_s()
    assert age is not None and age > 0
    assert procstat.state(os.getpid()) == "R"  # it is running: reading its own stat
