"""Run a replica as a local subprocess (tests, benchmarks, trying a model on a laptop).

It is the same ``python -m aimass_hpc.serve`` a serve job runs; this module only starts it,
waits for its endpoint record to say READY, and stops it by pid (SIGTERM: a real drain).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import SchedulerError
from aimass_hpc.serve.auth import read_token, token_path
from aimass_hpc.serve.endpoints import EndpointRecord, EndpointState, read_records


class LocalReplica:
    """A ``python -m aimass_hpc.serve`` child process and its endpoint record."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        recipe: Mapping[str, Any] | None = None,
        weights: str | os.PathLike[str] | None = None,
        name: str | None = None,
        version: str | None = None,
        model: str | None = None,
        repo: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        replica: int = 0,
        job_id: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id or f"local-{os.getpid()}-{time.monotonic_ns()}"
        self.replica = replica
        args = [sys.executable, "-m", "aimass_hpc.serve", "--run-dir", str(self.run_dir)]
        if recipe is not None:
            recipe_file = self.run_dir / f"recipe-{self.job_id}.json"
            recipe_file.write_text(json.dumps(dict(recipe)), encoding="utf-8")
            args += ["--recipe", str(recipe_file)]
            if name is not None:
                args += ["--name", name]
            if version is not None:
                args += ["--version", str(version)]
            if weights is not None:
                args += ["--weights", str(weights)]
            if model is not None:  # the ref to announce, e.g. name@alias
                args += ["--model", model]
        else:
            args += ["--model", str(model), "--repo", str(repo)]
        args += ["--host", host, "--port", str(port), "--replica", str(replica)]
        args += ["--job-id", self.job_id, *extra_args]
        self.args = args
        self.log_path = Path(log_path) if log_path else self.run_dir / f"{self.job_id}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- lives as long as the child
        child_env = dict(os.environ)
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=child_env
        )

    # -- state -----------------------------------------------------------------------------
    def record(self) -> EndpointRecord | None:
        """This replica's endpoint record, if written yet."""
        for rec in read_records(self.run_dir):
            if rec.job_id == self.job_id and rec.replica == self.replica:
                return rec
        return None

    @property
    def url(self) -> str:
        rec = self.record()
        if rec is None or rec.url is None:
            raise SchedulerError(f"replica {self.job_id} is not listening yet")
        return rec.url

    @property
    def token(self) -> str:
        return read_token(token_path(self.run_dir))

    def log_text(self) -> str:
        """What the replica printed so far."""
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_state(self, *states: str, timeout: float = 120.0) -> EndpointRecord:
        """Wait until the record reaches one of ``states``; raises if the process dies first."""
        wanted = {str(EndpointState(s)) for s in states}
        deadline = time.monotonic() + timeout
        while True:
            rec = self.record()
            if rec is not None and rec.state in wanted:
                return rec
            if self.proc.poll() is not None and (rec is None or rec.state not in wanted):
                raise SchedulerError(
                    f"replica exited with {self.proc.returncode} before {sorted(wanted)}:\n"
                    + self.log_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise SchedulerError(f"replica not {sorted(wanted)} after {timeout}s")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 120.0) -> EndpointRecord:
        """Wait for READY (raises with the log if it fails)."""
        rec = self.wait_state(EndpointState.READY, EndpointState.FAILED, timeout=timeout)
        if rec.state != EndpointState.READY:
            raise SchedulerError(f"replica FAILED: {rec.message}")
        return rec

    # -- control ---------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        """Send ``sig`` to this child (by pid)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), wait, SIGKILL if it hangs; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients can tell."""
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> LocalReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
        else:
            self._log.close()
