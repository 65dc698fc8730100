"""Run job scripts as local subprocesses, with the SLURM_* variables a one-node job sees.

For debugging without a cluster (``site_configs/local.toml``). One node only: multi-node jobs,
arrays and dependencies are refused with a clear error. Job state lives in a small directory
(``<runs root>/.local-jobs/``): ``<id>.json`` (pid, run dir), ``<id>.exit`` (exit code, written
when the script ends) and ``<id>.cancelled``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aimass_hpc.common import procstat
from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.common.fsutil import atomic_write_json, read_json
from aimass_hpc.common.slurm_cli import digits_or_none, is_job_id
from aimass_hpc.common.slurm_states import JobState
from aimass_hpc.config.job_spec import sbatch_options
from aimass_hpc.launch.scheduler.base import CommandRunner, JobStatus, Scheduler, submission_env

# The wrapper records the script's exit code atomically once it ends.
_WRAPPER = 'bash "$1"; rc=$?; printf "%s\\n" "$rc" > "$2.tmp"; mv -f "$2.tmp" "$2"; exit "$rc"'

_children: list[subprocess.Popen[bytes]] = []  # reaped on each status() so none stay zombies


def _gpu_count(options: dict[str, str]) -> int:
    """GPUs per node from ``--gpus-per-node=[TYPE:]N`` or ``--gres=gpu[:TYPE]:N`` (else 0)."""
    value = options.get("--gpus-per-node") or options.get("--gres") or ""
    # [0-9] and fullmatch: \d takes any Unicode digit, and $ would let a trailing newline in.
    match = re.fullmatch(r"(?:.*[^0-9])?([0-9]+)", value)
    return int(match.group(1)) if match else 0


class LocalScheduler(Scheduler):
    """A scheduler that runs each job at once in a subprocess on this machine."""

    name = "local"

    def __init__(self, state_dir: str | os.PathLike[str], runner: CommandRunner | None = None):
        super().__init__(runner)
        self.state_dir = Path(state_dir)

    # ------------------------------------------------------------------ checks

    def check_request(self, request: Any) -> None:
        if request.nodes > 1:
            raise InputError(f"nodes: the local scheduler runs one node, {request.nodes} asked")
        if request.array:
            raise InputError("array: the local scheduler does not run job arrays")
        if request.dependency:
            raise InputError("dependency: the local scheduler does not run dependencies")

    def _check_options(self, options: dict[str, str]) -> None:
        nodes = options.get("--nodes") or options.get("-N") or "1"
        if nodes.split("-")[0] != "1":
            raise InputError(f"nodes: the local scheduler runs one node, the script asks {nodes}")
        if "--array" in options or "-a" in options:
            raise InputError("array: the local scheduler does not run job arrays")
        if "--dependency" in options or "-d" in options:
            raise InputError("dependency: the local scheduler does not run dependencies")

    # ------------------------------------------------------------------ submit

    def _next_id(self) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "next_id", "a+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            text = fh.read().strip()
            job_id = digits_or_none(text) or 1
            fh.seek(0)
            fh.truncate()
            fh.write(f"{job_id + 1}\n")
            fh.flush()
        return str(job_id)

    def submit(
        self,
        script_path: str | os.PathLike[str],
        *,
        run_dir: str | os.PathLike[str],
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> str:
        script_path = Path(script_path).resolve()
        run_dir = Path(run_dir)
        options = sbatch_options(script_path.read_text(encoding="utf-8", errors="replace"))
        for arg in extra_args:  # command-line options win over #SBATCH lines, as with sbatch
            option, _, value = arg.partition("=")
            options[option] = value
        self._check_options(options)
        job_id = self._next_id()
        host = socket.gethostname().split(".")[0]
        ntasks = int(options.get("--ntasks-per-node", "1") or 1)
        cpus = options.get("--cpus-per-task") or options.get("-c")
        gpus = _gpu_count(options)
        name = options.get("--job-name") or options.get("-J") or script_path.name
        job_env = submission_env(env)
        job_env.update(
            {
                "SLURM_JOB_ID": job_id,
                "SLURM_JOBID": job_id,
                "SLURM_JOB_NAME": name,
                "SLURM_JOB_PARTITION": options.get("--partition", "local"),
                "SLURM_CLUSTER_NAME": "local",
                "SLURM_NNODES": "1",
                "SLURM_JOB_NUM_NODES": "1",
                "SLURM_NODELIST": host,
                "SLURM_JOB_NODELIST": host,
                "SLURMD_NODENAME": host,
                "SLURM_NODEID": "0",
                "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0",
                "SLURM_NTASKS": str(ntasks),
                "SLURM_NPROCS": str(ntasks),
                "SLURM_NTASKS_PER_NODE": str(ntasks),
                "SLURM_TASKS_PER_NODE": str(ntasks),
                "SLURM_CPUS_ON_NODE": str(os.cpu_count() or 1),
                "SLURM_SUBMIT_DIR": str(run_dir),
                "SLURM_SUBMIT_HOST": host,
                "SLURM_RESTART_COUNT": "0",
            }
        )
        if cpus:
            job_env["SLURM_CPUS_PER_TASK"] = cpus
        if gpus:
            job_env["SLURM_GPUS_ON_NODE"] = str(gpus)
            job_env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
        output = options.get("--output", "slurm-%j.out").replace("%j", job_id).replace("%x", name)
        out_path = run_dir / output
        out_path.parent.mkdir(parents=True, exist_ok=True)
        exit_file = self.state_dir / f"{job_id}.exit"
        with open(out_path, "ab") as out:
            proc = subprocess.Popen(
                ["bash", "-c", _WRAPPER, "aimass-local", str(script_path), str(exit_file)],
                cwd=run_dir,
                env=job_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cancel kills all of it
            )
        _children.append(proc)
        atomic_write_json(
            self.state_dir / f"{job_id}.json",
            {
                "job_id": job_id,
                "pid": proc.pid,
                "name": name,
                "run_dir": str(run_dir),
                "started_at": time.time(),
            },
        )
        return job_id

    # ------------------------------------------------------------------ status

    def _record(self, job_id: str) -> dict[str, Any] | None:
        if not is_job_id(job_id):  # ours are plain numbers; anything else is no file name
            return None
        try:
            return read_json(self.state_dir / f"{job_id}.json")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def status(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        for child in list(_children):
            if child.poll() is not None:
                _children.remove(child)
        out: dict[str, JobStatus] = {}
        for job_id in (str(i) for i in job_ids):
            record = self._record(job_id)
            if record is None:
                out[job_id] = JobStatus(job_id, "", JobState.UNKNOWN, reason="not found")
                continue
            exit_file = self.state_dir / f"{job_id}.exit"
            cancelled = (self.state_dir / f"{job_id}.cancelled").exists()
            host = socket.gethostname().split(".")[0]
            started = float(record.get("started_at", time.time()))
            if exit_file.exists():
                code_text = exit_file.read_text().strip()
                code = digits_or_none(code_text)  # the wrapper writes bash's $? (0-255)
                ended = exit_file.stat().st_mtime
                if cancelled:
                    state = JobState.CANCELLED
                else:
                    state = JobState.COMPLETED if code == 0 else JobState.FAILED
                reason = "" if state is JobState.COMPLETED else f"exit {code}"
            elif _alive(int(record["pid"])):
                state, code, ended, reason = JobState.RUNNING, None, time.time(), ""
            else:
                state = JobState.CANCELLED if cancelled else JobState.FAILED
                code, ended, reason = None, time.time(), "process vanished"
            out[job_id] = JobStatus(
                job_id=job_id,
                name=record.get("name", ""),
                state=state,
                elapsed=int(max(0.0, ended - started)),
                nodes=host,
                reason=reason,
                exit_code=code,
                source="local",
                raw_state=state.value,
            )
        return out

    # ------------------------------------------------------------------ control

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        ids = [str(i) for i in job_ids]
        statuses = self.status(ids)
        unknown = [i for i, st in statuses.items() if st.state is JobState.UNKNOWN]
        if unknown:
            raise NotFoundError(f"unknown job id(s): {', '.join(unknown)}")
        active = [i for i, st in statuses.items() if not st.is_terminal]
        for job_id in active:
            (self.state_dir / f"{job_id}.cancelled").touch()
            record = self._record(job_id) or {}
            with contextlib.suppress(ProcessLookupError, KeyError, PermissionError):
                os.killpg(int(record["pid"]), signal.SIGTERM)
        return active

    def requeue(self, job_id: str) -> None:
        raise ConflictError("requeue: the local scheduler cannot requeue jobs")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as ended)."""
    return procstat.state(pid) not in (None, "Z")
