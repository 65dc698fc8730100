"""``python -m aimass_hpc.serve``: the entry point a serve job runs on its node.

From the model repository::

    python -m aimass_hpc.serve --run-dir RUN --model NAME@ALIAS --repo /path/to/repo

or, without a repository, from a recipe file and a ``torch.save``-d state dict (tests,
benchmarks, quick checks)::

    python -m aimass_hpc.serve --run-dir RUN --recipe recipe.json [--weights w.pt] --name M

Inside a serve job (``aimass serve`` renders ``job_templates/serve.j2``) no option is needed:
command-line options win over the ``serve`` section of ``<run_dir>/spec.json`` (what the
user asked ``aimass serve`` for), which wins over the job's environment::

    AIMASS_RUN_DIR, AIMASS_SERVE_MODEL           run directory, model ref
    AIMASS_NODE_ADDR, AIMASS_SERVE_BIND          address to bind (bind=any: all interfaces)
    AIMASS_PORT_MIN, AIMASS_PORT_MAX             the site's port range
    AIMASS_PREEMPT_SIGNAL, AIMASS_MAX_RESTARTS   warning signal, crash restarts

With ``restarts`` > 0 this process supervises the replica: a replica that crashes (exits
non-zero without being told to stop) is started again, at most ``restarts`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import AimassError
from aimass_hpc.common.slurm_cli import digits_or_none, parse_signal
from aimass_hpc.serve.defaults import DEFAULTS

# What a replica does when neither the command line, spec.json nor the job environment says:
# the one home of serve defaults (aimass_hpc/serve/defaults.py). The argparse options below
# default to None so that "not given" can fall through to spec.json and the environment.
REPLICA_DEFAULTS: dict[str, Any] = DEFAULTS.replica_options()


def _default(key: str) -> str:
    """`` (default: X)`` for a help text, from the one home."""
    return f" (default: {getattr(DEFAULTS, key)})"


def build_parser() -> argparse.ArgumentParser:
    """The replica's command line. Every option defaults to None ("not given"): what is not
    given comes from spec.json, the job environment, then :data:`REPLICA_DEFAULTS`."""
    p = argparse.ArgumentParser(
        prog="python -m aimass_hpc.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", type=Path, help="the service's run directory ($AIMASS_RUN_DIR)")
    p.add_argument("--model", help="model ref: NAME, NAME:VERSION or NAME@ALIAS")
    p.add_argument("--repo", help="model repository path")
    p.add_argument("--recipe", type=Path, help="recipe JSON file (serve without a repository)")
    p.add_argument("--weights", type=Path, help="state dict saved with torch.save (with --recipe)")
    p.add_argument("--name", help="model name to report (with --recipe; else from --model)")
    p.add_argument("--version", dest="model_version", help="version to report (with --recipe)")
    p.add_argument(
        "--host", help="address to bind; 'auto' = this node's cluster address" + _default("host")
    )
    p.add_argument("--port", type=int, help="port to bind; 0 = any free port" + _default("port"))
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N" + _default("device"))
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="rows per forward and per request" + _default("max_batch_size"),
    )
    p.add_argument(
        "--max-wait-ms", type=float, help="longest wait to fill a batch" + _default("max_wait_ms")
    )
    p.add_argument(
        "--no-batching",
        dest="batching",
        action="store_const",
        const=False,
        help="forward every request alone (default: batching on)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, help="largest request body" + _default("max_body_bytes")
    )
    p.add_argument(
        "--max-queue", type=int, help="queued requests before 503" + _default("max_queue")
    )
    p.add_argument(
        "--drain-grace-s",
        type=float,
        help="answer this long after DRAINING" + _default("drain_grace_s"),
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        help="longest wait for in-flight requests" + _default("drain_timeout_s"),
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        help="Python's GIL switch interval (default: Python's, 5 ms)",
    )
    p.add_argument(
        "--model-process",
        dest="model_process",
        action="store_const",
        const=True,
        help="run the model in a process of its own, out of the HTTP server's GIL (default: "
        "when the replica may use 2 or more CPUs)",
    )
    p.add_argument(
        "--in-process",
        dest="model_process",
        action="store_const",
        const=False,
        help="run the model on a thread of the replica's process",
    )
    p.add_argument("--replica", type=int, help="replica index (default: the array task id)")
    p.add_argument("--job-id", help="job id (default: from Slurm's environment)")
    p.add_argument(
        "--handover",
        action="store_const",
        const=True,
        help="on the warning signal submit a replacement job and drain once it is READY"
        + _default("handover"),
    )
    p.add_argument(
        "--no-handover",
        dest="handover",
        action="store_const",
        const=False,
        help="on the warning signal just drain (the replica ends with its job)",
    )
    p.add_argument(
        "--restarts",
        type=int,
        help="restart a crashed replica up to N times" + _default("restarts"),
    )
    p.add_argument("--log-level", help="debug, info, warning, error" + _default("log_level"))
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed by :func:`build_parser` (unset options are None)."""
    return build_parser().parse_args(argv)


def _spec_options(run_dir: Path) -> dict[str, Any]:
    """``spec.serve`` of ``<run_dir>/spec.json`` (written by ``aimass serve``), if any."""
    path = run_dir / "spec.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    spec = doc.get("spec") if isinstance(doc, dict) else None
    section = spec.get("serve") if isinstance(spec, dict) else None
    return section if isinstance(section, dict) else {}


def _env_options(env: dict[str, str]) -> dict[str, Any]:
    """What the serve job's environment (job_templates/serve.j2) says."""
    out: dict[str, Any] = {}
    if env.get("AIMASS_SERVE_MODEL"):
        out["model"] = env["AIMASS_SERVE_MODEL"]
    if env.get("AIMASS_SERVE_BIND") == "any":
        out["host"] = "0.0.0.0"
    elif env.get("AIMASS_NODE_ADDR"):
        out["host"] = env["AIMASS_NODE_ADDR"]
    if env.get("AIMASS_PORT_MIN") and env.get("AIMASS_PORT_MAX"):
        out["port_range"] = (int(env["AIMASS_PORT_MIN"]), int(env["AIMASS_PORT_MAX"]))
    if env.get("AIMASS_PREEMPT_SIGNAL"):
        out["warning_signal"] = env["AIMASS_PREEMPT_SIGNAL"]
    restarts = digits_or_none(env.get("AIMASS_MAX_RESTARTS"))
    if restarts is not None:
        out["restarts"] = restarts
    return out


def resolve_options(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Command line over spec.json over the job environment over defaults."""
    env = dict(os.environ) if env is None else env
    run_dir = args.run_dir or (Path(env["AIMASS_RUN_DIR"]) if env.get("AIMASS_RUN_DIR") else None)
    if run_dir is None:
        raise SystemExit("python -m aimass_hpc.serve: give --run-dir (or set AIMASS_RUN_DIR)")
    out = dict(REPLICA_DEFAULTS)
    out.update(_env_options(env))
    out.update({k: v for k, v in _spec_options(run_dir).items() if v is not None})
    out.update({k: v for k, v in vars(args).items() if v is not None})
    out["run_dir"] = run_dir
    return out


def make_loader(opts: dict[str, Any]) -> tuple[str, str, Callable[[], Any]]:
    """(model ref, model name, a function that loads the model) from the resolved options."""
    from aimass_hpc.common.errors import InputError
    from aimass_hpc.repo.refs import Ref
    from aimass_hpc.serve import model_loader

    device = opts["device"]
    model = opts.get("model")
    if opts.get("recipe"):
        try:
            recipe = json.loads(Path(opts["recipe"]).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"not JSON: {exc}"
            raise InputError(f"--recipe {opts['recipe']}: {reason}") from None
        name = str(
            opts.get("name")
            or (Ref.parse(model, "model").name if model else Path(opts["recipe"]).stem)
        )
        version = opts.get("model_version")
        ref = model or (name if version is None else f"{name}:{version}")

        # partials, not closures: the loader runs in the model process (it must pickle)
        load_files = functools.partial(
            model_loader.load_from_files,
            recipe,
            opts.get("weights"),
            name=name,
            version=version,
            device=device,
        )
        return ref, name, load_files
    if not model or not opts.get("repo"):
        raise InputError("give --model and --repo (or --recipe)")
    repo = opts["repo"]
    name = Ref.parse(model, "model").name
    return (
        model,
        name,
        functools.partial(model_loader.load_from_repository, repo, model, device=device),
    )


def supervise(argv: list[str], restarts: int, warning_signal: str | int = "USR1") -> int:
    """Run the replica as a child; restart it after a crash, at most ``restarts`` times.

    Signals are passed on to the child, the site's ``warning_signal`` among them. A child that
    exits 0 (drained), or any exit after this process was told to stop, ends the supervision.
    """
    stop = {"asked": False}
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stop["asked"] = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    forwarded: set[int] = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
    # A site may warn with HUP, ALRM, ...: left at its default, that would end this process.
    with contextlib.suppress(ValueError):
        forwarded.add(parse_signal(warning_signal))
    for sig in forwarded:
        with contextlib.suppress(OSError):  # SIGKILL/SIGSTOP cannot be caught: nothing to pass
            signal.signal(sig, forward)
    attempt = 0
    while True:
        argv_child = [sys.executable, "-m", "aimass_hpc.serve", *argv, "--restarts", "0"]
        child = subprocess.Popen(argv_child)
        rc = child.wait()
        if rc < 0:
            rc = 128 - rc  # killed by a signal: the shell's convention
        if rc == 0 or stop["asked"] or attempt >= restarts:
            return rc
        attempt += 1
        print(
            f"aimass serve: replica exited with {rc}; restart {attempt} of {restarts}",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(min(2.0 * attempt, 10.0))


def main(argv: list[str] | None = None) -> int:
    """Run one replica until it is drained; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    opts = resolve_options(args)
    if int(opts["restarts"]) > 0:
        return supervise(argv, int(opts["restarts"]), str(opts["warning_signal"]))
    logging.basicConfig(
        level=getattr(logging, str(opts["log_level"]).upper(), logging.WARNING),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if opts["switch_interval_ms"]:
        # The forward thread takes the GIL back between torch ops; a busy event loop can make
        # it wait up to one switch interval each time. No clear gain measured on 2 shared
        # cores, so Python's default stays unless asked.
        sys.setswitchinterval(float(opts["switch_interval_ms"]) / 1000.0)
    if opts["threads"]:
        import torch

        torch.set_num_threads(int(opts["threads"]))
    from aimass_hpc.serve.app import ServeConfig
    from aimass_hpc.serve.server import ReplicaOptions, run_replica

    run_dir = Path(opts["run_dir"]).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        ref, name, loader = make_loader(opts)
    except AimassError as exc:
        print(f"aimass serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    port_range = opts.get("port_range")
    replica_opts = ReplicaOptions(
        run_dir=run_dir,
        model_ref=ref,
        model_name=name,
        host=str(opts["host"]),
        port=int(opts["port"]),
        port_range=(int(port_range[0]), int(port_range[1])) if port_range else None,
        warning_signal=str(opts["warning_signal"]),
        config=ServeConfig(
            max_batch_size=int(opts["max_batch_size"]),
            max_wait_ms=float(opts["max_wait_ms"]),
            batching=bool(opts["batching"]),
            max_body_bytes=int(opts["max_body_bytes"]),
            max_queue=int(opts["max_queue"]),
        ),
        job_id=opts.get("job_id"),
        replica=opts.get("replica"),
        drain_grace_s=float(opts["drain_grace_s"]),
        drain_timeout_s=float(opts["drain_timeout_s"]),
        log_level=str(opts["log_level"]),
        model_process=None if opts["model_process"] is None else bool(opts["model_process"]),
        threads=int(opts["threads"]) if opts["threads"] else None,
    )
    on_warning = None
    if opts["handover"]:
        from aimass_hpc.serve.handover import handover_on_warning

        on_warning = handover_on_warning
    return run_replica(replica_opts, loader, on_warning)


if __name__ == "__main__":
    sys.exit(main())
