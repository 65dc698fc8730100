"""``python -m aimass_hpc.runtime``: what ``srun`` starts on every rank of a training job.

    python -m aimass_hpc.runtime train [--config RUN_DIR/train.json]
    python -m aimass_hpc.runtime run [--config ...] SCRIPT [ARGS...]
    python -m aimass_hpc.runtime info

The stop-signal handler is installed before anything else (torch, MPI): Slurm's warning can
arrive while the heavy imports are still running, and Python's default for SIGUSR1 is to die.
Any exception ends the rank at once with status 1 (``os._exit``) so a crashing rank cannot
hang in interpreter shutdown; ``srun --kill-on-bad-exit`` then stops the other ranks.
"""

from __future__ import annotations

from aimass_hpc.runtime import preempt

preempt.install(preempt.DEFAULT_SIGNALS)

import argparse  # noqa: E402  (after the handler, on purpose)
import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from aimass_hpc.runtime.config import CONFIG_FILE, RunConfig, load_config  # noqa: E402
from aimass_hpc.runtime.env import WorldInfo, torchrun_env  # noqa: E402

if TYPE_CHECKING:
    from aimass_hpc.runtime.api import Job


def _config_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    run_dir = os.environ.get("AIMASS_RUN_DIR")
    if not run_dir:
        raise SystemExit("aimass runtime: no --config and no AIMASS_RUN_DIR in the environment")
    return Path(run_dir) / CONFIG_FILE


def serving_recipe(config: RunConfig, own: dict[str, object] | None) -> dict[str, object]:
    """How a server rebuilds the bare model: the task's own recipe, else call the task.

    ``pythonpath`` says where the factory's module lives (the spec's directory).
    """
    if own is not None:
        return {"pythonpath": list(config.pythonpath), **own}
    return {
        "factory": "aimass_hpc.runtime.task:model_from_task",
        "kwargs": {"task": config.task, "args": config.task_args, "pythonpath": config.pythonpath},
        "pythonpath": list(config.pythonpath),
    }


def cmd_train(config: RunConfig) -> int:
    """Run the built-in trainer for ``config``; requeue on a warning signal."""
    from aimass_hpc.runtime import rng
    from aimass_hpc.runtime.api import handle_stop, init, lineage, stop_verdict, write_result
    from aimass_hpc.runtime.task import load_task
    from aimass_hpc.runtime.trainer import Trainer

    job = init(config)
    if not config.task:
        raise SystemExit("aimass runtime: the run config names no task")
    rng.seed_everything(config.train.seed)  # identical model initialisation on every rank
    task = load_task(config.task, config.task_args, config.pythonpath)
    trainer = Trainer(
        task,
        config.train,
        backend=job.backend,
        store=job.store,
        metrics=job.metrics,
        warning_signal=config.warning_signal,
        lineage=lineage(config, job.world, 0),
        recipe=serving_recipe(config, task.recipe),
        tags=config.tags,
        requeue_allowed=job.world.restart_count < config.max_restarts,
    )
    result = trainer.fit()
    if result.status == "completed" and job.is_main:
        write_result(
            job.run_dir,
            "completed",
            job.world,
            result.metrics,
            result.final_ref,
            step=result.step,
            total_steps=result.total_steps,
            world=_world_summary(job),
        )
        print(f"aimass: training complete at step {result.step}: {result.final_ref}")
    code = 0
    if result.status != "completed":
        outcome = handle_stop(job, result.stop_code)
        verdict: tuple[str, str, int] | None = None
        if job.is_main:
            assert outcome is not None
            verdict = stop_verdict(result.stop_code, outcome, result.step, result.total_steps)
            write_result(
                job.run_dir,
                verdict[0],
                job.world,
                result.metrics,
                None,
                reason=verdict[1],
                step=result.step,
                total_steps=result.total_steps,
                checkpoint_ref=result.checkpoint_ref,
            )
        # Everyone learns whether rank 0's requeue worked: a warning that could not be acted
        # on ends the job as failed (exit 3), not COMPLETED with training unfinished.
        if job.world_size > 1:
            verdict = job.backend.broadcast_object(verdict)
        assert verdict is not None
        code = verdict[2]
    job.close()
    return code


def _world_summary(job: Job) -> dict[str, object]:
    """Where the job ran, for result.json (and the tests that check the backend)."""
    backend, world = job.backend, job.world
    return {
        "world_size": world.world_size,
        "num_nodes": world.num_nodes,
        "backend": backend.name,
        "controller": getattr(backend, "controller", None),
        "device": str(backend.device),
        "launcher": world.launcher,
        "local_world_size": world.local_world_size,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def cmd_run(config: RunConfig, script: str, args: list[str]) -> int:
    """Run a user script on this rank with the handler already installed.

    A script that called ``runtime.init()`` leaves the process group collectively when it
    returns (or calls ``sys.exit(0)``); one that raises exits with status 1 at once.
    """
    if config.run_dir:
        os.environ.setdefault("AIMASS_RUN_DIR", config.run_dir)
    # A script written for torchrun (init_process_group() with env://) finds its rank where
    # torchrun would put it; variables already set (a torchrun launch) stay as they are.
    for key, value in torchrun_env(WorldInfo.from_env()).items():
        os.environ.setdefault(key, value)
    for entry in reversed(config.pythonpath):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise  # a failing rank leaves at once; srun stops the others
    # This entry point ends with os._exit (no atexit hooks): leave the process group here,
    # together, so no rank exits while another still talks to it.
    api = sys.modules.get("aimass_hpc.runtime.api")
    if api is not None:
        api.finalize()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aimass_hpc.runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="built-in trainer")
    p_train.add_argument("--config", help="run config JSON (default $AIMASS_RUN_DIR/train.json)")
    p_run = sub.add_parser("run", help="run a Python script on this rank")
    p_run.add_argument("--config")
    p_run.add_argument("script")
    p_run.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("info", help="print this rank's world as JSON")
    ns = parser.parse_args(argv)

    if ns.command == "info":
        print(json.dumps(WorldInfo.from_env().to_dict(), sort_keys=True))
        return 0
    if ns.command == "run" and not ns.config and not os.environ.get("AIMASS_RUN_DIR"):
        config = RunConfig()
    else:
        config = load_config(_config_path(ns.config))
    if config.run_dir is None:
        config.run_dir = os.environ.get("AIMASS_RUN_DIR") or None
    preempt.install(("TERM", config.warning_signal))
    if ns.command == "train":
        return cmd_train(config)
    return cmd_run(config, ns.script, list(ns.args))


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code not in (None, 0) and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        rank = os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or "0"
        sys.stderr.write(f"aimass: rank {rank} failed:\n{traceback.format_exc()}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter shutdown: atexit hooks of half-initialised process groups can hang.
    os._exit(code)
