"""``aimass render|submit|status|wait|logs|cancel``: generic batch jobs (for researchers)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aimass_hpc.cli._options import SECONDS, site_option
from aimass_hpc.cli._output import echo_dry_run, echo_script, echo_submit_note
from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.common.slurm_cli import is_job_ref
from aimass_hpc.common.timelimit import format_elapsed
from aimass_hpc.config.site import Site, load_site
from aimass_hpc.launch.failure_report import Outcome, rank_lines, settled_outcome
from aimass_hpc.launch.runs import RunDir, find_run, list_runs
from aimass_hpc.launch.scheduler import JobState, JobStatus, check_answered, get_scheduler
from aimass_hpc.runtime.metrics import summarize

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout.")

_STATE_STYLE = {
    JobState.COMPLETED: "green",
    JobState.RUNNING: "cyan",
    JobState.PENDING: "yellow",
    JobState.COMPLETING: "cyan",
    JobState.UNKNOWN: "magenta",
}
_STATE_VALUES = {state.value for state in JobState}


def _is_spec(path: str) -> bool:
    return path.endswith(".toml")


def _load_request(path: str, site_obj: Site, sbatch_args: tuple[str, ...], name: str | None):
    from aimass_hpc.common.fsutil import check_input_file
    from aimass_hpc.config.job_spec import load_job_spec

    check_input_file(path, "spec file")  # a FIFO named x.toml would block the TOML reader
    overrides: dict[str, object] = {}
    if name:
        overrides["name"] = name
    request = load_job_spec(path, overrides)
    if sbatch_args:
        try:
            request = request.model_copy(
                update={"sbatch_extra": [*request.sbatch_extra, *_checked_extras(sbatch_args)]}
            )
        except ValueError as exc:
            raise InputError(f"--sbatch-arg: {exc}") from None
    return request


def _checked_extras(args: tuple[str, ...]) -> list[str]:
    from aimass_hpc.config.job_spec import check_sbatch_extra

    return [check_sbatch_extra(a) for a in args]


@click.command()
@click.argument("path", metavar="SPEC.toml|SCRIPT")
@site_option
@click.option(
    "--sbatch-arg",
    "sbatch_args",
    multiple=True,
    metavar="--OPT=VALUE",
    help="Extra sbatch option (repeatable).",
)
def render(path: str, site_ref: str | None, sbatch_args: tuple[str, ...]) -> None:
    """Print the job script a spec renders to (nothing is written or queued).

    The output is byte for byte what a submission writes to ``job.sh``, except for the run
    directory's path (a placeholder here).
    """
    from aimass_hpc.common.fsutil import read_user_text

    site_obj = load_site(site_ref)
    if not _is_spec(path):
        echo_script(read_user_text(path, "batch script"))
        return
    from aimass_hpc.launch.render import render_request

    request = _load_request(path, site_obj, sbatch_args, None)
    echo_script(render_request(site_obj, request))


@click.command()
@click.argument("path", metavar="SPEC.toml|SCRIPT")
@site_option
@click.option("--dry-run", is_flag=True, help="Print the script; queue nothing, write nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job; exit 0 only if COMPLETED.")
@click.option("--name", default=None, help="Job name (default: the spec's, or the script's).")
@click.option(
    "--sbatch-arg",
    "sbatch_args",
    multiple=True,
    metavar="--OPT=VALUE",
    help="Extra sbatch option (repeatable).",
)
@json_option
def submit(
    path: str,
    site_ref: str | None,
    dry_run: bool,
    wait_: bool,
    name: str | None,
    sbatch_args: tuple[str, ...],
    as_json: bool,
) -> None:
    """Submit a job spec (.toml with a [job] table) or a plain batch script.

    Either way the job gets a run directory (spec, script, logs, state) under the site's
    runs root.
    """
    from aimass_hpc.launch.submit import submit as submit_request
    from aimass_hpc.launch.submit import submit_script

    site_obj = load_site(site_ref)
    if _is_spec(path):
        request = _load_request(path, site_obj, sbatch_args, name)
        sub = submit_request(
            site_obj, request, dry_run=dry_run, spec={"source": str(Path(path).resolve())}
        )
    else:
        sub = submit_script(
            site_obj, path, name=name, sbatch_args=list(sbatch_args), dry_run=dry_run
        )
    if dry_run:
        echo_dry_run(sub.to_dict(), sub.script, as_json)
        return
    echo_submit_note(sub.note)
    if not wait_:
        if as_json:
            click.echo(json.dumps(sub.to_dict(), indent=2))
        else:
            click.echo(f"Submitted job {sub.job_id} ({sub.run_dir.path})")
        return
    if not as_json:
        click.echo(f"Submitted job {sub.job_id} ({sub.run_dir.path}); waiting...", err=True)
    assert sub.job_id is not None
    finals = {sub.job_id: get_scheduler(site_obj).wait([sub.job_id])[sub.job_id]}
    runs = {sub.job_id: sub.run_dir}
    outcomes = _outcomes(finals, runs)
    if as_json:
        shown = json.loads(_status_json(finals, runs, outcomes))[0]
        click.echo(json.dumps({**sub.to_dict(), "status": shown}, indent=2))
    else:
        _print_table(finals, runs, outcomes)
    sys.exit(0 if _all_ok(outcomes) else 1)


def _resolve_refs(site_obj: Site, refs: tuple[str, ...]) -> tuple[list[str], dict[str, RunDir]]:
    """Job ids for refs (ids or run dir paths) and the run dirs we know of."""
    ids: list[str] = []
    runs: dict[str, RunDir] = {}
    for ref in refs:
        if is_job_ref(ref):
            ids.append(ref)
            with contextlib.suppress(NotFoundError):
                runs[ref] = find_run(ref, site_obj.runs_root)
            continue
        run = find_run(ref, site_obj.runs_root)
        job_id = run.job_id or _job_of_unknown_submission(site_obj, run)
        ids.append(job_id)
        runs[job_id] = run
    return ids, runs


def _job_of_unknown_submission(site_obj: Site, run: RunDir) -> str:
    """The job of a run whose submit command timed out, adopted once the scheduler shows it.

    ``NotFoundError`` for a run that was never queued; ``SchedulerError`` while the scheduler
    cannot be asked.
    """
    from aimass_hpc.launch.submit import adopt_queued_job

    status = run.read_state().get("status")
    if status != "submit_unknown":
        raise NotFoundError(f"run {run.path} was never submitted (no job id in state.json)")
    job_id = adopt_queued_job(get_scheduler(site_obj), run, run.root)
    if job_id is None:
        raise NotFoundError(
            f"run {run.path}: its submission timed out and no job for it is queued or in "
            "accounting; it was not queued (submit it again)"
        )
    note = f"aimass: note: run {run.path}: adopted job {job_id} (its submit had timed out)"
    click.echo(note, err=True)
    return job_id


def _progress_text(run: RunDir | None) -> str | None:
    """Training progress from the run's metrics.jsonl, e.g. ``step 40/120 loss 0.31``."""
    summary = summarize(run.path) if run is not None else None
    if not summary or not summary.get("step"):
        return None
    text = f"step {summary['step']}"
    if summary.get("total_steps"):
        text += f"/{summary['total_steps']}"
    if isinstance(summary.get("loss"), int | float):
        text += f" loss {summary['loss']:.3g}"
    return text


def _outcomes(statuses: dict[str, JobStatus], runs: dict[str, RunDir]) -> dict[str, Outcome]:
    """What each job's status shows, corrected by its run directory (result.json, logs); a
    finished job's outcome is recorded in its run directory's state.json."""
    return {job_id: settled_outcome(st, runs.get(job_id)) for job_id, st in statuses.items()}


def _print_table(
    statuses: dict[str, JobStatus], runs: dict[str, RunDir], outcomes: dict[str, Outcome]
) -> None:
    table = Table("id", "name", "state", "elapsed", "nodes", "progress", "reason")
    for job_id, st in statuses.items():
        run = runs.get(job_id)
        outcome = outcomes[job_id]
        progress = _progress_text(run)
        name = run.name if run is not None else st.name
        shown = JobState(outcome.state) if outcome.state in _STATE_VALUES else st.state
        style = _STATE_STYLE.get(shown, "red" if st.is_terminal else "")
        state = Text(outcome.state, style=style)
        if st.restart_count:
            state.append(f" (restart {st.restart_count})")
        reason = outcome.reason
        if st.exit_code and st.is_terminal and reason == st.reason:  # the scheduler's word
            reason = f"exit {st.exit_code}" + (f"; {reason}" if reason else "")
        # Text cells: a job name or reason is shown as it is, never read as rich markup.
        table.add_row(
            Text(job_id),
            Text(name),
            state,
            format_elapsed(st.elapsed),
            Text(st.nodes or "-"),
            Text(progress or "-"),
            Text(reason or "-"),
        )
    console = Console()
    console.print(table)
    for job_id, outcome in outcomes.items():
        failure = outcome.failure
        if failure is not None and failure.traceback:
            console.print(
                Text(f"job {job_id}: {failure.summary()}; the end of rank {failure.rank}'s "
                     f"traceback (aimass logs {job_id} --rank {failure.rank}):", style="red")
            )  # fmt: skip
            console.print(Text("\n".join(f"  {line}" for line in failure.traceback)))


def _status_json(
    statuses: dict[str, JobStatus], runs: dict[str, RunDir], outcomes: dict[str, Outcome]
) -> str:
    out = []
    for job_id, st in statuses.items():
        data = st.to_dict()
        outcome = outcomes[job_id]
        # "state" is what happened (FAILED where the run says it failed); the scheduler's own
        # word stays in "scheduler_state".
        data["scheduler_state"] = data["state"]
        data["state"] = outcome.state
        data["reason"] = outcome.reason
        data["result_status"] = outcome.result_status
        data["failure"] = outcome.failure.to_dict() if outcome.failure else None
        data["ok"] = outcome.ok
        run = runs.get(job_id)
        data["run_dir"] = str(run.path) if run is not None else None
        if run is not None:
            data["name"] = run.name
            data["progress"] = summarize(run.path)
        out.append(data)
    return json.dumps(out, indent=2)


def _all_ok(outcomes: dict[str, Outcome]) -> bool:
    """Every job ended COMPLETED and no run says otherwise (exit 0 of wait / --wait)."""
    return all(outcome.ok for outcome in outcomes.values())


@click.command()
@click.argument("jobs", nargs=-1, metavar="[JOB]...")
@site_option
@click.option("--last", default=20, show_default=True, help="Without JOBs: this many recent runs.")
@json_option
def status(jobs: tuple[str, ...], site_ref: str | None, last: int, as_json: bool) -> None:
    """Status of jobs (ids or run directories); without JOBs, the site's recent runs.

    One scheduler call for all of them.
    """
    site_obj = load_site(site_ref)
    if jobs:
        ids, runs = _resolve_refs(site_obj, jobs)
    else:
        runs = {}
        for run in list_runs(site_obj.runs_root, limit=last):
            job_id = run.job_id
            if job_id is not None:
                runs[job_id] = run
        ids = list(runs)
    statuses = get_scheduler(site_obj).status(ids) if ids else {}
    outcomes = _outcomes(statuses, runs)
    if as_json:
        click.echo(_status_json(statuses, runs, outcomes))
    elif statuses:
        _print_table(statuses, runs, outcomes)
    else:
        click.echo(f"no submitted runs under {site_obj.runs_root}")
    # Exit 5 when accounting failed for a job (it may have run), 3 for an id nobody knows
    # (only when asked for: a listing may hold long-purged runs).
    check_answered(statuses if jobs else {i: st for i, st in statuses.items() if st.lookup_failed})


@click.command()
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
@site_option
@click.option("--timeout", type=SECONDS, default=None, help="Give up after this many seconds.")
@json_option
def wait(jobs: tuple[str, ...], site_ref: str | None, timeout: float | None, as_json: bool) -> None:
    """Wait until the jobs end; exit 0 if all COMPLETED, 1 otherwise.

    A job whose run says it failed (``result.json``) is FAILED whatever Slurm says; a failed
    job's reason names its first failing rank, exit code and error
    (``aimass logs JOB --rank N`` shows that rank's whole output).

    Exit 3 for an id no scheduler command knows, 5 when the scheduler cannot say what became
    of a job (it left the queue and the accounting lookup failed).
    """
    site_obj = load_site(site_ref)
    ids, runs = _resolve_refs(site_obj, jobs)
    scheduler = get_scheduler(site_obj)
    check_answered(scheduler.status(ids))
    final = scheduler.wait(ids, timeout)
    outcomes = _outcomes(final, runs)
    if as_json:
        click.echo(_status_json(final, runs, outcomes))
    else:
        _print_table(final, runs, outcomes)
    sys.exit(0 if _all_ok(outcomes) else 1)


@click.command()
@click.argument("job", metavar="JOB")
@site_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the job writes.")
@click.option("--restart", type=int, default=None, help="Log of this restart (default: latest).")
@click.option("--task", type=int, default=None, help="Array task index.")
@click.option("--batch", is_flag=True, help="Slurm's own output file (before the script's logs).")
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=None,
    help="Only this rank's lines (training jobs label every line with its rank).",
)
def logs(
    job: str,
    site_ref: str | None,
    follow: bool,
    restart: int | None,
    task: int | None,
    batch: bool,
    rank: int | None,
) -> None:
    """Print a job's log (one file per restart, in its run directory)."""
    if rank is not None and batch:
        raise InputError("--rank: Slurm's own output file (--batch) has no rank labels")
    site_obj = load_site(site_ref)
    run = find_run(job, site_obj.runs_root)
    if task is None and "_" in job:
        task = int(job.split("_", 1)[1])
    job_id = run.job_id

    def current() -> Path | None:
        if batch:
            files = run.batch_logs()
            return files[-1] if files else None
        return run.log_file(restart, task)

    path = current()
    if not follow:
        if path is None:
            what = f"restart {restart}" if restart is not None else "any restart"
            raise NotFoundError(f"no log yet for job {job} ({what}) in {run.logs_dir}")
        text = path.read_text(encoding="utf-8", errors="replace")
        if rank is not None:
            lines = rank_lines(text, rank)
            if not lines:
                raise NotFoundError(f"job {job}: no lines from rank {rank} in {path}")
            text = "".join(line + "\n" for line in lines)
        sys.stdout.write(text)
        return
    _follow(site_obj, run, job_id, current, restart is None and not batch, rank)


def _follow(
    site_obj: Site, run: RunDir, job_id: str | None, current, switch: bool, rank: int | None = None
) -> None:
    """Print new output as it appears; move to a newer restart's log; stop when the job ends.

    With ``rank``, only that rank's whole lines (a partial line waits for its end).
    """
    scheduler = get_scheduler(site_obj)
    path, offset, last_poll, done = current(), 0, 0.0, False
    pending = b""
    while True:
        if path is not None and path.exists():
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            if chunk:
                offset += len(chunk)
                if rank is not None:
                    whole, _, pending = (pending + chunk).rpartition(b"\n")
                    text = whole.decode("utf-8", errors="replace")
                    chunk = "".join(line + "\n" for line in rank_lines(text, rank)).encode()
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        if done:
            return
        newer = current() if switch or path is None else path
        if newer is not None and newer != path:
            path, offset, pending = newer, 0, b""
            continue
        if job_id is not None and time.monotonic() - last_poll > 3:
            last_poll = time.monotonic()
            done = scheduler.status([job_id])[job_id].is_terminal  # one more read, then stop
        time.sleep(0.5)


@click.command()
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
@site_option
@json_option
def cancel(jobs: tuple[str, ...], site_ref: str | None, as_json: bool) -> None:
    """Cancel jobs (ids or run directories). Unknown ids are an error (exit 3)."""
    site_obj = load_site(site_ref)
    ids, _ = _resolve_refs(site_obj, jobs)
    cancelled = get_scheduler(site_obj).cancel(ids)
    finished = [i for i in ids if i not in cancelled]
    if as_json:
        click.echo(json.dumps({"cancelled": cancelled, "already_finished": finished}))
        return
    if cancelled:
        click.echo(f"cancelled {', '.join(cancelled)}")
    if finished:
        click.echo(f"already finished: {', '.join(finished)}")
