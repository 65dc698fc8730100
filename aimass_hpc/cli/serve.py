"""``aimass serve`` (start / upgrade / stop a service), ``aimass endpoints``, ``aimass bench``.

The work is done by :mod:`aimass_hpc.launch.serving` (login-node orchestration) and
:mod:`aimass_hpc.serve` (the replicas, the client, the load generator).
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from aimass_hpc.cli._options import SECONDS, site_option
from aimass_hpc.cli._output import echo_dry_run, echo_submit_note
from aimass_hpc.serve.defaults import DEFAULTS

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout.")

_COUNT = TextColumn("{task.completed}/{task.total}")
_STATE_STYLE = {
    "READY": "green",
    "LOADING": "cyan",
    "PENDING": "yellow",
    "DRAINING": "magenta",
    "FAILED": "red",
    "STOPPED": "dim",
}


class _ServeGroup(click.Group):
    """``aimass serve REF ...`` is ``aimass serve start REF ...``; subcommands stay reachable."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["start", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ServeGroup)
def serve() -> None:
    """Serve a model from the repository as a long-running job: aimass serve NAME@ALIAS.

    \b
    aimass serve NAME@ALIAS|NAME:VERSION [options]   start a service (= serve start)
    aimass serve upgrade NAME@ALIAS                  blue/green switch to the alias's target
    aimass serve stop NAME@ALIAS|RUN_DIR             drain and stop every replica
    aimass serve status NAME|RUN_DIR                 desired vs actual replicas, decisions
    """


@serve.command("start")
@click.argument("ref", metavar="NAME@ALIAS|NAME:VERSION")
@site_option
@click.option(
    "--replicas", type=click.IntRange(min=1), default=DEFAULTS.replicas, show_default=True
)
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=DEFAULTS.gpus,
    show_default=True,
    help="GPUs per replica.",
)
@click.option(
    "--cpus",
    type=click.IntRange(min=1),
    default=DEFAULTS.cpus,
    show_default=True,
    help="CPUs per replica.",
)
@click.option("--reservation", help="Slurm reservation (default: the site's serving one).")
@click.option("--partition", help="Partition (default: the site's serving partition).")
@click.option("--time", "time_limit", help="Time limit per job; replicas hand over before it.")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=DEFAULTS.port,
    help="Port (default: a free one in the site's range).",
)
@click.option("--repo", help="Model repository (default: the site's).")
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=DEFAULTS.max_batch_size,
    show_default=True,
)
@click.option(
    "--max-wait-ms", type=click.FloatRange(min=0), default=DEFAULTS.max_wait_ms, show_default=True
)
@click.option(
    "--batching/--no-batching",
    default=DEFAULTS.batching,
    show_default=True,
    help="--no-batching: forward every request alone.",
)
@click.option(
    "--handover/--no-handover",
    default=DEFAULTS.handover,
    show_default=True,
    help="Before the time limit, start a replacement and drain once it is READY; "
    "--no-handover: let replicas end at the time limit.",
)
@click.option(
    "--supervise/--no-supervise",
    default=False,
    show_default=True,
    help="Start a supervisor job (1 CPU) that health-checks the replicas and replaces one "
    "that died, hung or fails its checks.",
)
@click.option(
    "--check-interval",
    type=click.FloatRange(min=0.2),
    default=None,
    help="With --supervise: seconds between health checks "
    f"(default {DEFAULTS.check_interval_s:g}).",
)
@click.option(
    "--check-failures",
    type=click.IntRange(min=1),
    default=None,
    help="With --supervise: failed checks in a row before a replica is replaced "
    f"(default {DEFAULTS.check_failures}).",
)
@click.option(
    "--min-replicas",
    type=click.IntRange(min=1),
    help="Autoscale (implies --supervise) between --min-replicas and --max-replicas on "
    "ongoing requests per replica.",
)
@click.option("--max-replicas", type=click.IntRange(min=1), help="Autoscale: the most replicas.")
@click.option(
    "--target-ongoing",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULTS.autoscale_target_ongoing,
    show_default=True,
    help="Autoscale: ongoing requests per replica to aim at (Ray Serve's default).",
)
@click.option(
    "--upscale-delay",
    type=click.FloatRange(min=0),
    default=DEFAULTS.upscale_delay_s,
    show_default=True,
    help="Autoscale: seconds the need must last before replicas are added.",
)
@click.option(
    "--downscale-delay",
    type=click.FloatRange(min=0),
    default=DEFAULTS.downscale_delay_s,
    show_default=True,
    help="Autoscale: seconds the slack must last before replicas are taken away.",
)
@click.option(
    "--engine",
    type=click.Choice(["torch", "vllm"]),
    default="torch",
    show_default=True,
    help="torch: the built-in server; vllm: a Hugging Face causal LM (aimass models "
    "import-hf) behind vLLM's OpenAI-compatible API, tensor-parallel over --gpus.",
)
@click.option("--wait/--no-wait", "wait_", default=False, help="Wait until every replica is READY.")
@click.option(
    "--timeout",
    type=SECONDS,
    default=DEFAULTS.ready_timeout_s,
    show_default=True,
    help="For --wait.",
)
@click.option("--dry-run", is_flag=True, help="Check and print the job script; queue nothing.")
@json_option
def start(
    ref: str,
    site_ref: str | None,
    replicas: int,
    gpus: int,
    cpus: int,
    reservation: str | None,
    partition: str | None,
    time_limit: str | None,
    port: int,
    repo: str | None,
    max_batch_size: int,
    max_wait_ms: float,
    batching: bool,
    handover: bool,
    supervise: bool,
    check_interval: float | None,
    check_failures: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
    target_ongoing: float,
    upscale_delay: float,
    downscale_delay: float,
    engine: str,
    wait_: bool,
    timeout: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Start REF as a service: one job-array task per replica, each serving HTTP."""
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.serving import Autoscale, ServeOptions, start_service

    site = load_site(site_ref)
    opts = ServeOptions(
        ref=ref, replicas=replicas, gpus=gpus, cpus=cpus, time=time_limit,
        reservation=reservation, partition=partition, port=port, repo=repo,
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, batching=batching,
        handover=handover, supervise=supervise, engine=engine,
    )  # fmt: skip
    if check_interval is not None:
        opts.check_interval_s = check_interval
    if check_failures is not None:
        opts.check_failures = check_failures
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas or 1
        opts.autoscale = Autoscale(
            min_replicas=lo, max_replicas=max_replicas or max(lo, replicas),
            target_ongoing=target_ongoing, upscale_delay_s=upscale_delay,
            downscale_delay_s=downscale_delay,
        )  # fmt: skip
    sub = start_service(site, opts, dry_run=dry_run)
    replicas = opts.replicas  # autoscaling starts within [min, max]
    summary: dict[str, Any] = {**sub.to_dict(), "model": ref, "replicas": replicas}
    if opts.supervise and not dry_run:
        from aimass_hpc.launch.serving import read_supervisor

        summary["supervisor_job_id"] = (read_supervisor(sub.run_dir.path) or {}).get("job_id")
    if dry_run:
        echo_dry_run(summary, sub.script, as_json)
        return
    echo_submit_note(sub.note)
    console = Console(stderr=as_json)
    console.print(
        f"[bold]submitted[/] service {ref}: job {sub.job_id}, {replicas} replica(s)\n"
        f"run dir {sub.run_dir.path}"
        + (f"\nsupervisor job {summary['supervisor_job_id']}" if opts.supervise else "")
    )
    if wait_:
        ready = _wait_with_progress(site, sub.run_dir.path, replicas, timeout, console)
        summary["endpoints"] = [r.url for r in ready]
        for r in ready:
            console.print(f"  replica {r.replica}: [green]READY[/] {r.url} (version {r.version})")
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))


def _wait_with_progress(site: Any, run_dir: Any, replicas: int, timeout: float, console: Console):
    from aimass_hpc.launch.serving import wait_ready

    with Progress(
        TextColumn("[bold]waiting for READY"), BarColumn(), _COUNT,
        console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("ready", total=replicas)
        return wait_ready(
            site, run_dir, replicas, timeout=timeout,
            progress=lambda done, total: bar.update(task, completed=done),
        )  # fmt: skip


@serve.command("upgrade")
@click.argument("ref", metavar="NAME@ALIAS")
@site_option
@click.option(
    "--timeout",
    type=SECONDS,
    default=DEFAULTS.ready_timeout_s,
    show_default=True,
    help="Longest wait for the new replicas.",
)
@click.option("--force", is_flag=True, help="Start new replicas even if the version is the same.")
@json_option
def upgrade_cmd(ref: str, site_ref: str | None, timeout: float, force: bool, as_json: bool) -> None:
    """Blue/green: serve what NAME@ALIAS names now, then drain the old replicas.

    New replicas start beside the old ones; only when every one is READY are the old ones
    drained, so clients see no failed request. After `aimass models rollback` the same
    command goes back to the previous version.
    """
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.serving import upgrade

    site = load_site(site_ref)
    console = Console(stderr=as_json)
    with Progress(
        TextColumn("[bold]new replicas READY"), BarColumn(), _COUNT,
        console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("ready", total=None)
        result = upgrade(
            site, ref, timeout=timeout, force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.new_job_id is None:
        console.print(f"{ref} already serves version {result.new_version}; nothing to do")
        return
    console.print(
        f"[bold]upgraded[/] {ref}: version {', '.join(result.old_versions) or '?'} -> "
        f"{result.new_version} (job {result.new_job_id}); drained jobs "
        f"{', '.join(result.stopped_jobs) or '-'}"
    )


@serve.command("stop")
@click.argument("target", metavar="NAME@ALIAS|NAME|RUN_DIR")
@site_option
@click.option("--wait/--no-wait", "wait_", default=True, help="Wait until replicas have drained.")
@json_option
def stop(target: str, site_ref: str | None, wait_: bool, as_json: bool) -> None:
    """Drain and stop every replica of a service (its jobs are cancelled; they drain first)."""
    from pathlib import Path

    from aimass_hpc.common.errors import NotFoundError
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.serving import list_endpoints, reconcile, stop_service
    from aimass_hpc.serve.endpoints import read_records

    site = load_site(site_ref)
    path = Path(target).expanduser()
    if path.is_dir():
        records = [r for r in reconcile(site, read_records(path)) if r.state not in _FINAL]
    else:
        records = list_endpoints(site, target)
    if not records:
        raise NotFoundError(f"no running replica of {target!r} under {site.runs_root}")
    # The supervisor first, then the replicas, then any job a handover queued meanwhile.
    if wait_:
        with Console(stderr=True).status("draining"):
            ids = stop_service(site, records, wait=True)
    else:
        ids = stop_service(site, records, wait=False)
    if as_json:
        click.echo(json.dumps({"cancelled": ids}))
    else:
        click.echo(f"stopped {len(records)} replica(s): jobs {', '.join(ids) or '-'}")


_FINAL = {"STOPPED", "FAILED"}


@serve.command("status")
@click.argument("target", metavar="NAME|NAME@ALIAS|RUN_DIR")
@site_option
@click.option(
    "--decisions",
    "last",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many of the supervisor's last decisions to show.",
)
@json_option
def status_cmd(target: str, site_ref: str | None, last: int, as_json: bool) -> None:
    """Desired vs actual replicas of a service, its supervisor and its last decisions."""
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.serving import service_run_dirs, service_status

    site = load_site(site_ref)
    docs = [service_status(site, d, decisions=last) for d in service_run_dirs(site, target)]
    if as_json:
        click.echo(json.dumps(docs, indent=2, default=str))
        return
    console = Console()
    for doc in docs:
        sup = doc["supervisor"]
        console.print(
            f"[bold]{doc['model']}[/] {doc['run_dir']}\n"
            f"  desired: {doc['desired_replicas']} replica(s), {doc['desired_state']}"
            f"{' (stopping)' if doc['stopping'] else ''}\n"
            f"  actual:  {doc['ready_replicas']} READY, {doc['coming_replicas']} coming "
            f"({', '.join(f'{k} {v}' for k, v in sorted(doc['states'].items())) or '-'})\n"
            "  supervisor: "
            + (
                f"job {sup.get('job_id')} {sup.get('state') or '?'}, heartbeat "
                f"{str(sup.get('heartbeat') or '-')[:19]}, replaced {sup.get('replaced', 0)}"
                if sup
                else "none (start with --supervise)"
            )
        )
        if doc["decisions"]:
            table = Table(title="last decisions")
            for col in ("at", "action", "replica", "job", "why"):
                table.add_column(col)
            for d in doc["decisions"]:
                table.add_row(
                    str(d.get("at", ""))[:19], str(d.get("action", "")),
                    str(d.get("replica", "-")),
                    str(d.get("new_job_id") or d.get("job_id") or "-"), str(d.get("why", "")),
                )  # fmt: skip
            console.print(table)


@click.command()
@click.argument("target", required=False, metavar="[NAME|NAME@ALIAS|NAME:VERSION]")
@site_option
@click.option("--all", "show_all", is_flag=True, help="Include stopped and failed replicas.")
@click.option("--no-probe", is_flag=True, help="Do not ask each replica for /readyz.")
@json_option
def endpoints(
    target: str | None, site_ref: str | None, show_all: bool, no_probe: bool, as_json: bool
) -> None:
    """List service replicas (from their endpoint records) with their health."""
    from aimass_hpc.config.site import load_site
    from aimass_hpc.launch.serving import list_endpoints, probe

    site = load_site(site_ref)
    records = list_endpoints(site, target, include_final=show_all)
    rows = []
    for rec in records:
        health = "-" if no_probe else probe(rec)
        rows.append({**rec.to_dict(), "engine": rec.engine_name, "health": health})
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(f"no {'' if show_all else 'live '}endpoints under {site.runs_root}")
        return
    table = Table(title=f"endpoints under {site.runs_root}")
    cols = ("model", "version", "engine", "replica", "state", "health", "url", "job", "node")
    for col in (*cols, "started", "history"):
        table.add_column(col)
    for row in rows:
        style = _STATE_STYLE.get(row["state"], "")
        table.add_row(
            row["model_ref"], str(row["version"] or "-"), row["engine"], str(row["replica"]),
            f"[{style}]{row['state']}[/]" if style else row["state"], row["health"],
            row["url"] or "-", row["job_id"], row["node"] or "-", row["started"][:19],
            _history_cell(row.get("history") or []),
        )  # fmt: skip
    Console().print(table)


def _history_cell(history: list[dict[str, Any]], last: int = 4) -> str:
    """The last state changes, oldest first, the newest with its reason (``--json``: all)."""
    states = [str(h.get("state", "?")) for h in history[-last:]]
    text = ">".join(states) or "-"
    why = history[-1].get("why") if history else None
    return f"{text} ({why})" if why else text


@click.command()
@click.argument("target", metavar="URL|NAME@ALIAS|NAME:VERSION")
@site_option
@click.option(
    "--batch",
    "batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Samples per request.",
)
@click.option("--shape", help="Input shape of one sample, e.g. 3,32,32 (default: the model's).")
@click.option("--dtype", default=None, help="Input dtype (default: the model's).")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds of measurement (after 1 s of warm-up).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["npy", "json"]), default="npy", show_default=True
)
@click.option("--token", help="Bearer token (URL targets; default $AIMASS_SERVE_TOKEN).")
@click.option(
    "--llm", is_flag=True, help="An LLM (vLLM) service: streaming completions (auto-detected)."
)
@click.option(
    "--prompt-len", type=click.IntRange(min=1), default=32, show_default=True,
    help="LLM: prompt length in tokens (about).",
)  # fmt: skip
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=32, show_default=True,
    help="LLM: tokens generated per request.",
)  # fmt: skip
@json_option
def bench(
    target: str,
    site_ref: str | None,
    batch: int,
    shape: str | None,
    dtype: str | None,
    concurrency: int,
    duration: float,
    fmt: str,
    token: str | None,
    llm: bool,
    prompt_len: int,
    max_tokens: int,
    as_json: bool,
) -> None:
    """Load-test a service: throughput and latency percentiles under concurrent requests.

    For an LLM service: requests/s, output tokens/s, time to first token and inter-token
    latency percentiles of streaming completions.
    """
    from aimass_hpc.serve.bench import bench_service, parse_shape
    from aimass_hpc.serve.client import Client
    from aimass_hpc.serve.llm import is_llm_service
    from aimass_hpc.serve.llm_bench import bench_llm

    runs_root = None
    if not target.startswith(("http://", "https://")):
        from aimass_hpc.config.site import load_site

        runs_root = load_site(site_ref).runs_root
    dims = parse_shape(shape) if shape else None
    console = Console(stderr=as_json)
    with (
        Client(target, runs_root=runs_root, token=token, retry_timeout=10) as client,
        Progress(
            TextColumn("[bold]load"), BarColumn(), TextColumn("{task.fields[ok]} ok"),
            TimeRemainingColumn(), console=console, transient=True,
        ) as bar,
    ):  # fmt: skip
        task = bar.add_task("load", total=1.0, ok=0)
        llm = llm or is_llm_service(client)
        report = {
            "target": target,
            **bench_llm(
                target, runs_root=runs_root, token=token, concurrency=concurrency,
                prompt_len=prompt_len, max_tokens=max_tokens, duration=duration,
                progress=lambda frac, ok: bar.update(task, completed=frac, ok=ok),
            ),
        } if llm else {
            "target": target,
            **bench_service(
                client, batch=batch, shape=dims, dtype=dtype, concurrency=concurrency,
                duration=duration, binary=fmt == "npy",
                progress=lambda frac, ok: bar.update(task, completed=frac, ok=ok),
            ),
        }  # fmt: skip
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"aimass bench {target}", show_header=False)
    for key, value in report.items():
        table.add_row(key, str(value))
    Console().print(table)
    if report["requests_failed"]:
        raise SystemExit(1)
