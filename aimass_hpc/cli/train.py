"""``aimass train`` (submit a data-parallel training job) and ``aimass plot`` (its curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aimass_hpc.cli._options import site_option
from aimass_hpc.cli._output import echo_dry_run, echo_submit_note
from aimass_hpc.common.errors import InputError
from aimass_hpc.common.fsutil import os_error, shown_path

if TYPE_CHECKING:
    from rich.console import Console


@click.command()
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@site_option
@click.option("--nodes", type=click.IntRange(min=1), help="override job.nodes")
@click.option("--gpus-per-node", type=click.IntRange(min=0), help="override job.gpus_per_node")
@click.option("--tasks-per-node", type=click.IntRange(min=1), help="override job.tasks_per_node")
@click.option(
    "--backend",
    type=click.Choice(["fsdp", "horovod", "torch"]),
    help="override the spec's / site's training backend",
)
@click.option(
    "--resume-from",
    "resume_from",
    metavar="RUN_DIR",
    help="start from the newest checkpoint of another run (its run dir) while this run has "
    "none of its own, e.g. to continue on another number of ranks",
)
@click.option("--time", "time_limit", help="override job.time (Slurm syntax)")
@click.option(
    "--sbatch-arg",
    "sbatch_args",
    multiple=True,
    metavar="--OPT[=VALUE]",
    help="extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable; options aimass "
    "sets itself are refused)",
)
@click.option("--dry-run", is_flag=True, help="check and print the job script; queue nothing")
@click.option("--wait", is_flag=True, help="wait until the job ends (restarts included)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def train(
    spec_path: str,
    site_ref: str | None,
    nodes: int | None,
    gpus_per_node: int | None,
    tasks_per_node: int | None,
    backend: str | None,
    resume_from: str | None,
    time_limit: str | None,
    sbatch_args: tuple[str, ...],
    dry_run: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Train the task or script of SPEC.toml as a batch job on the cluster.

    Checks everything that can be checked on the login node first (task reference, backend,
    GPUs per node, Horovod installed); nothing is queued when a check fails.
    """
    from aimass_hpc.config.job_spec import with_sbatch_extra
    from aimass_hpc.config.site import load_site
    from aimass_hpc.config.train_spec import load_train_spec, plan_training
    from aimass_hpc.launch.submit import submit

    overrides: dict[str, Any] = {
        "job.nodes": nodes,
        "job.gpus_per_node": gpus_per_node,
        "job.tasks_per_node": tasks_per_node,
        "job.time": time_limit,
        "backend": backend,
    }
    if gpus_per_node and tasks_per_node is None:
        overrides["job.tasks_per_node"] = gpus_per_node  # one task per GPU
    spec = load_train_spec(spec_path, overrides)
    site = load_site(site_ref)
    plan = plan_training(spec, site)
    if resume_from is not None:
        source = Path(resume_from).expanduser().resolve()
        if not (source / "checkpoints.jsonl").is_file():
            raise InputError(f"--resume-from: {source} is no run directory with checkpoints")
        plan.config.resume_from = str(source)
    repository = Path(plan.config.repository or "")
    if not dry_run and plan.config.repository and not repository.is_dir():
        # Create the repository here, once: a bad path fails before queueing, and the ranks
        # of many jobs never race to create it. (Skipped when it exists: h5py is slow to load.)
        from aimass_hpc.repo import ModelRepository

        ModelRepository(repository)
    request = with_sbatch_extra(plan.request, sbatch_args, site, where="--sbatch-arg")
    sub = submit(
        site,
        request,
        spec={"train": plan.config.to_dict()},
        files=plan.files(),
        dry_run=dry_run,
    )
    summary = {
        **sub.to_dict(),
        "backend": plan.config.backend,
        "world_size": plan.request.nodes * plan.request.ntasks_per_node,
        "model": plan.config.model_name,
        "repository": plan.config.repository,
    }
    if dry_run:
        echo_dry_run(summary, sub.script, as_json)
        return
    echo_submit_note(sub.note)
    if not as_json or wait:
        # rich only when something goes through it: `--json` without `--wait` prints plain
        # JSON, and rich costs tens of milliseconds to import on every submission.
        from rich.console import Console

        console = Console(stderr=as_json)
        if not as_json:
            console.print(
                f"[bold]submitted[/] job {sub.job_id}: {summary['world_size']} ranks, "
                f"backend {summary['backend']}, model {summary['model']}\n"
                f"run dir {sub.run_dir.path}"
            )
        if wait:
            summary.update(_wait(site, sub.job_id, sub.run_dir.path, console))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    if wait and summary.get("state") != "COMPLETED":
        raise SystemExit(1)


def _wait(site: Any, job_id: str | None, run_dir: Path, console: Console) -> dict[str, Any]:
    """Wait for the job (through requeues), then report its result.json."""
    from rich.text import Text

    from aimass_hpc.common.fsutil import read_json
    from aimass_hpc.launch.failure_report import settled_outcome
    from aimass_hpc.launch.runs import RunDir
    from aimass_hpc.launch.scheduler import get_scheduler

    assert job_id is not None
    with console.status(f"waiting for job {job_id}"):
        final = get_scheduler(site).wait([job_id])[job_id]
    # What happened, not only Slurm's word: a run whose result.json says failed is FAILED.
    outcome = settled_outcome(final, RunDir(run_dir))
    out: dict[str, Any] = {
        "state": outcome.state,
        "scheduler_state": final.state.value,
        "reason": outcome.reason,
        "failure": outcome.failure.to_dict() if outcome.failure else None,
        "restarts": final.restart_count,
    }
    try:
        out["result"] = read_json(run_dir / "result.json")
    except FileNotFoundError:
        out["result"] = None
    if not console.stderr:
        ended = f"job {job_id} ended {outcome.state} after {final.restart_count} restarts"
        console.print(Text(ended + (f": {outcome.reason}" if outcome.reason else "")))
        failure = outcome.failure
        if failure is not None and failure.traceback:
            console.print(
                Text(f"rank {failure.rank} (aimass logs {job_id} --rank {failure.rank}):")
            )
            console.print(Text("\n".join(f"  {line}" for line in failure.traceback)))
        if out["result"] and outcome.ok:
            res = out["result"]
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in (res.get("metrics") or {}).items())
            console.print(f"final model {res.get('final_ref')}: {metrics}")
    return out


@click.command()
@click.argument("run")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG path")
@site_option
def plot(run: str, output: str | None, site_ref: str | None) -> None:
    """Draw the loss and metric curves of RUN (a run directory or a job id) to a PNG.

    A job id (or ``last``) is looked up under the runs root of the site (--site).
    """
    from aimass_hpc.runtime.metrics import read_metrics
    from aimass_hpc.runtime.plot import plot_metrics

    run_dir = _find_run_dir(run, site_ref)
    records = read_metrics(run_dir)
    if not records:
        raise InputError(f"run {run}: no metrics yet ({run_dir / 'metrics.jsonl'} is empty)")
    target = Path(output) if output else run_dir / "metrics.png"
    try:
        plot_metrics(records, target, title=run_dir.name)
    except OSError as exc:
        raise os_error(exc, f"cannot write the plot {shown_path(target)}") from None
    click.echo(str(target))


def _find_run_dir(run: str, site_ref: str | None) -> Path:
    """RUN as a directory path, else as a job id / run name under the site's runs root."""
    path = Path(run).expanduser()
    try:
        if path.is_dir():
            return path
    except (OSError, ValueError):
        pass  # not a path this OS can look up (too long a name): try it as a job id
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.runs import find_run

    return find_run(run, load_site(site_ref).runs_root).path
