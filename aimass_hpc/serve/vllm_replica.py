"""``python -m aimass_hpc.serve.vllm_replica``: one replica of an ``--engine vllm`` service.

It runs in the job with the main environment and drives vLLM's OpenAI-compatible API server,
which runs with the site's vLLM (``[serving.vllm]``: a venv's python, a module or a container
image; resolved into ``spec.serve.vllm`` by ``aimass serve``):

1. writes the replica's endpoint record (LOADING), the same record torch replicas write;
2. materializes the model (a Hugging Face directory stored by ``aimass models import-hf``)
   into node-local temp, so vLLM never loads weights from a hub;
3. starts ``<vllm python> -m vllm.entrypoints.openai.api_server`` on this node's address and a
   free port of the site's range, with the service token as its API key and tensor
   parallelism over the job's GPUs, plus the site's ``args`` (CPU settings on the dev site);
4. waits for ``/health``, sends one real completion, then marks the record READY;
5. on SIGTERM/SIGINT drains (record DRAINING, ``/readyz`` 503 via
   :mod:`aimass_hpc.serve.vllm_readyz`, answers for ``drain_grace_s``), stops vLLM and marks
   the record STOPPED; on the warning signal it first hands over
   (:func:`aimass_hpc.serve.handover.handover_on_warning`); a vLLM that exits on its own
   marks the record FAILED with the last line of its log (``<run_dir>/vllm.<key>.log``).

Options come as for torch replicas (:func:`aimass_hpc.serve.__main__.resolve_options`):
command line, then ``spec.serve``, then the job environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from aimass_hpc.common.errors import AimassError, InputError
from aimass_hpc.common.slurm_cli import job_ref_from_env, parse_signal
from aimass_hpc.serve.auth import ensure_token, token_path
from aimass_hpc.serve.endpoints import EndpointRecord, EndpointState, cluster_address, write_record

API_SERVER = "vllm.entrypoints.openai.api_server"
MIDDLEWARE_MODULE = "aimass_vllm_readyz"
START_TIMEOUT_S = 900.0  # a large model on a slow filesystem can take minutes
# After the drain grace, how long vLLM gets to stop before SIGKILL: well within Slurm's
# KillWait, so the replica's own exit is what ends the step.
KILL_AFTER_DRAIN_S = 8.0
# A scancel (upgrade, stop, scale-down) sends SIGTERM to every process of the job at once, vLLM
# included, before this replica has drained it: vLLM's default then aborts the requests in
# flight (seen on the dev cluster: "EngineCore encountered an issue" to a client mid-upgrade).
# With a shutdown timeout it finishes them first; below KILL_AFTER_DRAIN_S and Slurm's KillWait.
VLLM_SHUTDOWN_TIMEOUT_S = 6


def vllm_command(cfg: dict[str, Any], args: list[str], gpus: int) -> list[str]:
    """The argv that starts vLLM's API server the site's way (python, module or container)."""
    server = ["-m", API_SERVER, *args]
    if cfg.get("python"):
        return [str(cfg["python"]), *server]
    if cfg.get("module"):
        line = f"module load {shlex.quote(str(cfg['module']))} && exec python3 " + shlex.join(
            server
        )
        return ["bash", "-lc", line]
    if cfg.get("container"):
        nv = ["--nv"] if gpus > 0 else []
        return ["apptainer", "exec", *nv, str(cfg["container"]), "python3", *server]
    raise InputError("spec.serve.vllm: give one of python, module, container (site [serving.vllm])")


def vllm_launch(
    cfg: dict[str, Any],
    model_dir: Path,
    model_name: str,
    host: str,
    port: int,
    token: str,
    gpus: int,
    workdir: Path,
    *,
    base_env: Mapping[str, str],
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of vLLM's API server for one replica.

    The service token is vLLM's API key, given in the environment (``VLLM_API_KEY``) and never
    on the command line: other users of the node can read a command line (``ps``), and a
    token that starts with ``-`` would read as an option there.
    """
    args = [
        "--model", str(model_dir), "--served-model-name", model_name,
        "--host", host, "--port", str(port),
        "--tensor-parallel-size", str(max(gpus, 1)),
        "--middleware", f"{MIDDLEWARE_MODULE}.Readyz",
        "--shutdown-timeout", str(VLLM_SHUTDOWN_TIMEOUT_S),
        *[str(a) for a in cfg.get("args") or []],
    ]  # fmt: skip
    env = dict(base_env)
    env.update({str(k): str(v) for k, v in (cfg.get("env") or {}).items()})
    env.update(
        VLLM_HOST_IP=host if host not in ("0.0.0.0", "::") else "127.0.0.1",
        VLLM_NO_USAGE_STATS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_API_KEY=token,
        AIMASS_VLLM_DRAIN_FILE=str(workdir / "draining"),
        PYTHONPATH=str(workdir),  # the middleware only: not this environment's path
    )
    env.pop("VIRTUAL_ENV", None)
    return vllm_command(cfg, args, gpus), env


def free_port(host: str, port_range: tuple[int, int] | None) -> int:
    """A port on ``host`` that nobody listens on now (in ``port_range`` when given)."""
    candidates = [0] if port_range is None else list(range(port_range[0], port_range[1] + 1))
    random.shuffle(candidates)
    for port in candidates[:256]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}" + (f" in {port_range}" if port_range else ""))


@dataclass
class _Opts:
    """What :func:`handover_on_warning` reads of a replica's options."""

    drain_grace_s: float


class VllmReplica:
    """One vLLM replica; :meth:`run` returns the process exit code."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.o = opts
        self.run_dir = Path(opts["run_dir"]).resolve()
        self.opts = _Opts(float(opts["drain_grace_s"]))
        model = str(opts.get("model") or "")
        if not model or not opts.get("repo"):
            raise InputError("vllm replica: spec.serve needs model and repo")
        from aimass_hpc.repo.refs import Ref

        env = os.environ
        array_task = env.get("SLURM_ARRAY_TASK_ID")
        if opts.get("replica") is not None:
            replica = int(opts["replica"])
        else:
            replica = int(array_task) if array_task else 0
        self.record = EndpointRecord(
            model_ref=model,
            model_name=Ref.parse(model, "model").name,
            version=None,
            state=EndpointState.LOADING,
            job_id=str(opts.get("job_id") or job_ref_from_env(env) or f"local-{os.getpid()}"),
            replica=replica,
            run_dir=str(self.run_dir),
            pid=os.getpid(),
            node=env.get("SLURMD_NODENAME") or socket.gethostname(),
            token_file=str(token_path(self.run_dir)),
            engine="vllm",  # the supervisor checks it with a completion, not /v1/predict
        )
        self.stop = False
        self.warning = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.log_path = self.run_dir / f"vllm.{self.record.key}.log"

    # -- signals ------------------------------------------------------------------------------
    def _on_stop(self, _signum: int, _frame: object) -> None:
        self.stop = True

    def _on_warning(self, _signum: int, _frame: object) -> None:
        self.warning = True
        self.stop = True

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        with contextlib.suppress(ValueError, OSError):
            signal.signal(parse_signal(str(self.o["warning_signal"])), self._on_warning)

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until told to stop; 0 after a clean drain, 1 when the replica failed."""
        self._install_signals()
        write_record(self.record, EndpointState.LOADING, message="engine vllm")
        try:
            return self._run()
        except Exception as exc:  # the record must never stay LOADING/READY for a dead replica
            return self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._kill_vllm()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self) -> int:
        from aimass_hpc.repo import ModelRepository
        from aimass_hpc.repo.hf import check_hf, materialize

        token = ensure_token(self.run_dir)
        repo = ModelRepository(str(self.o["repo"]), create=False)
        version = repo.get(self.record.model_ref)
        check_hf(version)
        self.record.version = str(version.number)
        base = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or None
        self.workdir = Path(tempfile.mkdtemp(prefix="aimass-vllm-", dir=base))
        model_dir = materialize(repo, version.ref, self.workdir / "model")
        shutil.copyfile(
            Path(__file__).with_name("vllm_readyz.py"), self.workdir / f"{MIDDLEWARE_MODULE}.py"
        )
        host = str(self.o["host"])
        host = cluster_address() if host == "auto" else host
        pr = self.o.get("port_range")
        port = int(self.o["port"]) or free_port(host, (int(pr[0]), int(pr[1])) if pr else None)
        self._start_vllm(model_dir, host, port, token)
        write_record(self.record, EndpointState.LOADING, host=host, port=port)
        if not self._wait_ready(token):
            return self._drain() if self.stop else self._fail(self._exit_message())
        write_record(self.record, EndpointState.READY, message="engine vllm")
        while not self.stop:
            if self.proc is not None and self.proc.poll() is not None:
                return self._fail(self._exit_message())
            time.sleep(0.2)
        if self.warning and self.o.get("handover"):
            from aimass_hpc.serve.handover import handover_on_warning

            try:
                asyncio.run(handover_on_warning(cast(Any, self)))
            except Exception as exc:
                print(f"vllm replica: handover failed ({exc}); draining anyway", file=sys.stderr)
        return self._drain()

    def _start_vllm(self, model_dir: Path, host: str, port: int, token: str) -> None:
        cfg = dict(self.o.get("vllm") or {})
        gpus = int(self.o.get("gpus") or 0)
        assert self.workdir is not None
        argv, env = vllm_launch(
            cfg, model_dir, self.record.model_name, host, port, token, gpus, self.workdir,
            base_env=os.environ,
        )  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 -- the child keeps it
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.workdir),
                start_new_session=True,  # its workers die with its process group
            )
        finally:
            log.close()

    def _wait_ready(self, token: str) -> bool:
        """/health 200 and one real completion answered; False when vLLM died or we stop."""
        url = self.record.url
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=10.0, trust_env=False) as http:
            while not self.stop and time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                return False
            resp = http.post(
                f"{url}/v1/completions",
                json={"model": self.record.model_name, "prompt": "Hello", "max_tokens": 1},
                headers={"Authorization": f"Bearer {token}"},
                timeout=120.0,
            )
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up completion answered {resp.status_code}: {resp.text[:200]}")
        return True

    def _drain(self) -> int:
        if self.workdir is not None:
            (self.workdir / "draining").write_text("draining\n")
        write_record(self.record, EndpointState.DRAINING)
        deadline = time.monotonic() + float(self.o["drain_grace_s"])
        while time.monotonic() < deadline:
            time.sleep(0.05)
        # Clients have moved on; STOPPED first, because vLLM's shutdown waits for idle
        # keep-alive connections and Slurm may end the step before it is done.
        write_record(self.record, EndpointState.STOPPED)
        self._kill_vllm(min(float(self.o["drain_timeout_s"]), KILL_AFTER_DRAIN_S))
        return 0

    def _kill_vllm(self, timeout: float = 10.0) -> None:
        """SIGTERM to vLLM's process group (it ends its engine workers), SIGKILL after."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _exit_message(self) -> str:
        rc = self.proc.poll() if self.proc is not None else None
        last = ""
        with contextlib.suppress(OSError):
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln]
            last = lines[-1][-300:] if lines else ""
        return f"vLLM exited with {rc} ({self.log_path.name}: {last})"

    def _fail(self, message: str) -> int:
        print(f"vllm replica: failed: {message}", file=sys.stderr, flush=True)
        write_record(self.record, EndpointState.FAILED, message=message)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run one vLLM replica until it is drained; returns the exit code."""
    from aimass_hpc.serve.__main__ import parse_args, resolve_options

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    opts = resolve_options(args)
    Path(opts["run_dir"]).mkdir(parents=True, exist_ok=True)
    try:
        replica = VllmReplica(opts)
    except AimassError as exc:
        print(f"aimass serve (vllm): error: {exc}", file=sys.stderr)
        return exc.exit_code
    return replica.run()


if __name__ == "__main__":
    sys.exit(main())
