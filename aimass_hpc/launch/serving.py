"""Services on the cluster, from the login node: start, list, stop, upgrade (blue/green).

A service is one batch job array: task ``i`` is replica ``i``, each an independent job (a crash
or a time limit ends one replica, not the service). Every replica runs
``python -m aimass_hpc.serve`` (see :mod:`aimass_hpc.serve.__main__`), which reads its options
from the run directory's ``spec.json`` and announces itself in ``<run_dir>/endpoints/``. This
module writes the PENDING records at submission, reconciles records with the scheduler (a job
that ended without saying so), and drives upgrades:

    upgrade NAME@ALIAS:  start replicas of the version the alias names now (new run dir)
                         -> wait until every one is READY -> scancel the old ones, which
                         drain (DRAINING, in-flight requests finish) and stop.

Clients (:class:`aimass_hpc.serve.Client`) follow the records, so none of their requests fail.
``aimass models rollback`` + ``upgrade`` goes back the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError
from aimass_hpc.common.fsutil import read_json
from aimass_hpc.common.names import SLURM_NAME, check_tree
from aimass_hpc.config.job_spec import JobRequest, request_from_mapping
from aimass_hpc.config.site import Site
from aimass_hpc.launch.scheduler import JobState, get_scheduler
from aimass_hpc.launch.submit import Submission, submit
from aimass_hpc.repo.refs import Ref
from aimass_hpc.serve.auth import ensure_token, token_path
from aimass_hpc.serve.defaults import DEFAULTS
from aimass_hpc.serve.endpoints import (
    FINAL_STATES,
    EndpointRecord,
    EndpointState,
    find_records,
    read_records,
    write_record,
)

# Scheduler states that mean the job is over but ended badly.
_BAD_ENDS = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "TIMEOUT"}


@dataclass
class ServeOptions:
    """What ``aimass serve`` asks for."""

    ref: str
    replicas: int = DEFAULTS.replicas
    gpus: int = DEFAULTS.gpus
    cpus: int = DEFAULTS.cpus  # one for HTTP, one for the forward (more for torch threads)
    time: str | None = None
    reservation: str | None = None
    partition: str | None = None
    port: int = DEFAULTS.port
    repo: str | None = None  # default: the site's model repository
    max_batch_size: int = DEFAULTS.max_batch_size
    max_wait_ms: float = DEFAULTS.max_wait_ms
    batching: bool = DEFAULTS.batching
    threads: int | None = DEFAULTS.threads  # torch threads; None: cpus - 1
    handover: bool = DEFAULTS.handover
    mem: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more `serve` options, passed as-is

    def serve_section(self, repo: str, version: int | None) -> dict[str, Any]:
        """The ``spec.serve`` payload the replicas read."""
        return {
            "model": self.ref,
            "repo": repo,
            "resolved_version": version,
            "replicas": self.replicas,
            "port": self.port,
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_ms,
            "batching": self.batching,
            "threads": self.threads or max(1, self.cpus - 1),
            "handover": self.handover,
            **self.extra,
        }


def check_serve_options(opts: ServeOptions, where: str = "serve") -> None:
    """Refuse bad options before anything touches the repository or the scheduler.

    Every string must be free text (no NUL, no CR; :mod:`aimass_hpc.common.names`), the model
    reference must use the repository's name rules, and Slurm names must be Slurm names.
    ``InputError`` names the option (``serve.reservation``, ``serve.ref``...).
    """
    check_tree(
        {
            "ref": opts.ref,
            "time": opts.time,
            "reservation": opts.reservation,
            "partition": opts.partition,
            "repo": opts.repo,
            "mem": opts.mem,
            "extra": opts.extra,
        },
        where,
    )
    Ref.parse(opts.ref, f"{where}.ref")
    for key in ("reservation", "partition"):
        value = getattr(opts, key)
        if value is not None:
            SLURM_NAME.check(value, f"{where}.{key}")


def check_model(repo: str, ref: str | Ref) -> int:
    """The version ``ref`` names now; refuses a model whose recipe cannot be served."""
    from aimass_hpc.repo import ModelRepository
    from aimass_hpc.serve.model_loader import parse_recipe

    version = ModelRepository(repo).get(ref)
    parse_recipe(version.recipe, where=f"model {version.ref} recipe")
    return int(version.number)


def plan_service(site: Site, opts: ServeOptions) -> tuple[JobRequest, dict[str, Any]]:
    """The job request and the ``spec`` payload for ``opts`` (checks the model first)."""
    if opts.replicas < 1:
        raise InputError("replicas: must be at least 1")
    check_serve_options(opts)
    repo = str(Path(opts.repo).expanduser()) if opts.repo else str(site.models_root)
    version = check_model(repo, opts.ref)
    name = Ref.parse(opts.ref).name
    threads = opts.threads or max(1, opts.cpus - 1)
    request = request_from_mapping(
        {
            "kind": "serve",
            "name": f"serve-{name}",
            "command": [site.python, "-m", "aimass_hpc.serve"],
            "env": {"OMP_NUM_THREADS": str(threads)},
            "gpus_per_node": opts.gpus,
            "cpus_per_task": opts.cpus,
            "mem": opts.mem,
            "time": opts.time,
            "partition": opts.partition or site.serving.partition,
            "reservation": opts.reservation,
            "array": f"0-{opts.replicas - 1}",
            "requeue": site.preemption.max_restarts > 0,
            "signal": True,
            "template_vars": {"model": opts.ref},
        },
        where="serve",
    )
    return request, {"serve": opts.serve_section(repo, version)}


def start_service(
    site: Site, opts: ServeOptions, *, dry_run: bool = False, runs_root: Path | None = None
) -> Submission:
    """Submit the service; writes its token and one PENDING record per replica."""
    request, spec = plan_service(site, opts)
    sub = submit(site, request, spec=spec, dry_run=dry_run, runs_root=runs_root)
    if dry_run or sub.job_id is None:
        return sub
    run_dir = sub.run_dir.path
    ensure_token(run_dir)
    name = Ref.parse(opts.ref).name
    for i in range(opts.replicas):
        write_record(
            EndpointRecord(
                model_ref=opts.ref,
                model_name=name,
                version=None,
                state=EndpointState.PENDING,
                job_id=f"{sub.job_id}_{i}",
                replica=i,
                run_dir=str(run_dir),
                token_file=str(token_path(run_dir)),
            )
        )
    return sub


def reconcile(site: Site, records: list[EndpointRecord]) -> list[EndpointRecord]:
    """Mark records whose job has ended (without saying so) STOPPED or FAILED, in one poll."""
    live = [r for r in records if EndpointState(r.state) not in FINAL_STATES]
    if not live:
        return records
    try:
        statuses = get_scheduler(site).status([r.job_id for r in live])
    except SchedulerError:
        return records  # cannot ask: show what the records say
    for rec in live:
        st = statuses.get(rec.job_id)
        if st is None or not st.is_terminal:
            continue
        bad = st.state.value in _BAD_ENDS
        write_record(
            rec,
            EndpointState.FAILED if bad else EndpointState.STOPPED,
            message=f"job ended {st.state.value}" + (f" ({st.reason})" if st.reason else ""),
        )
    return records


def list_endpoints(
    site: Site, target: str | Ref | None = None, *, include_final: bool = False
) -> list[EndpointRecord]:
    """Records under the site's runs root (reconciled with the scheduler); ``target`` as in
    :meth:`EndpointRecord.matches` (``NAME``, ``NAME:N``, ``NAME:latest``, ``NAME@ALIAS``)."""
    records = reconcile(site, find_records(site.runs_root, target))
    if not include_final:
        records = [r for r in records if EndpointState(r.state) not in FINAL_STATES]
    return records


def probe(rec: EndpointRecord, timeout: float = 2.0) -> str:
    """Health of a replica as a word: ready, draining/loading, down, or - (not listening)."""
    if rec.url is None or EndpointState(rec.state) in FINAL_STATES:
        return "-"
    try:
        resp = httpx.get(f"{rec.url}/readyz", timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return "down"
    if resp.status_code == 200:
        return "ready"
    try:
        return str(resp.json().get("phase", resp.status_code)).lower()
    except ValueError:
        return f"http {resp.status_code}"


def wait_ready(
    site: Site,
    run_dir: Path,
    replicas: int,
    *,
    timeout: float = DEFAULTS.ready_timeout_s,
    progress: Callable[[int, int], None] | None = None,
) -> list[EndpointRecord]:
    """Wait until ``replicas`` replicas of ``run_dir`` are READY; FAILED or timeout raises."""
    deadline = time.monotonic() + timeout
    last_poll = 0.0
    while True:
        records = read_records(run_dir)
        ready = [r for r in records if r.state == EndpointState.READY]
        if progress is not None:
            progress(len(ready), replicas)
        if len(ready) >= replicas:
            return ready
        failed = [r for r in records if r.state == EndpointState.FAILED]
        if failed:
            raise SchedulerError(
                f"replica {failed[0].replica} of {run_dir} failed: {failed[0].message}"
            )
        if time.monotonic() - last_poll > 5:  # a job that died before writing anything
            reconcile(site, records)
            last_poll = time.monotonic()
        if time.monotonic() > deadline:
            states = ", ".join(f"{r.replica}:{r.state}" for r in records)
            raise SchedulerError(f"replicas not READY after {timeout:.0f}s ({states})")
        time.sleep(0.5)


def stop_records(site: Site, records: Iterable[EndpointRecord]) -> list[str]:
    """Cancel the jobs of ``records`` (replicas drain on the SIGTERM); returns job ids."""
    ids = sorted({r.job_id for r in records if EndpointState(r.state) not in FINAL_STATES})
    if not ids:
        return []
    scheduler = get_scheduler(site)
    statuses = scheduler.status(ids)
    active = [i for i in ids if i in statuses and not statuses[i].is_terminal]
    if active:
        scheduler.cancel(active)
    return active


def wait_stopped(
    records: Iterable[EndpointRecord], timeout: float = DEFAULTS.stop_timeout_s
) -> None:
    """Wait until the given replicas' records are final (drained)."""
    keys = {(r.run_dir, r.key) for r in records}
    deadline = time.monotonic() + timeout
    while keys and time.monotonic() < deadline:
        for run_dir, key in list(keys):
            for rec in read_records(run_dir):
                if rec.key == key and EndpointState(rec.state) in FINAL_STATES:
                    keys.discard((run_dir, key))
        time.sleep(0.3)


def service_options(run_dir: Path) -> ServeOptions:
    """The options a running service was started with (to start its successor alike)."""
    doc = read_json(run_dir / "spec.json")
    serve = dict((doc.get("spec") or {}).get("serve") or {})
    req = doc.get("request") or {}
    known = {
        "model", "repo", "resolved_version", "replicas", "port", "max_batch_size",
        "max_wait_ms", "batching", "threads", "handover",
    }  # fmt: skip
    return ServeOptions(
        ref=serve["model"],
        replicas=int(serve.get("replicas", DEFAULTS.replicas)),
        gpus=int(req.get("gpus_per_node") or DEFAULTS.gpus),
        cpus=int(req.get("cpus_per_task") or DEFAULTS.cpus),
        time=req.get("time"),
        reservation=req.get("reservation"),
        partition=req.get("partition"),
        mem=req.get("mem"),
        port=int(serve.get("port", DEFAULTS.port)),
        repo=serve.get("repo"),
        max_batch_size=int(serve.get("max_batch_size", DEFAULTS.max_batch_size)),
        max_wait_ms=float(serve.get("max_wait_ms", DEFAULTS.max_wait_ms)),
        batching=bool(serve.get("batching", DEFAULTS.batching)),
        threads=serve.get("threads", DEFAULTS.threads),
        handover=bool(serve.get("handover", DEFAULTS.handover)),
        extra={k: v for k, v in serve.items() if k not in known},
    )


@dataclass
class UpgradeResult:
    """What :func:`upgrade` did."""

    ref: str
    old_versions: list[str]
    new_version: str
    new_run_dir: str | None
    new_job_id: str | None
    stopped_jobs: list[str]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def upgrade(
    site: Site,
    ref: str,
    *,
    timeout: float = DEFAULTS.ready_timeout_s,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> UpgradeResult:
    """Blue/green: serve what ``ref`` names now beside the old replicas, then drain them."""
    # The same reference, however it was written (NAME = NAME:latest = NAME@latest).
    want = Ref.parse(ref, "ref")
    old = [r for r in list_endpoints(site, want) if r.parsed_ref == want]
    if not old:
        raise NotFoundError(f"no running service for {ref!r} under {site.runs_root}")
    run_dirs = sorted({r.run_dir for r in old}, key=lambda d: max(
        r.started for r in old if r.run_dir == d))  # fmt: skip
    opts = service_options(Path(run_dirs[-1]))
    repo = opts.repo or str(site.models_root)
    target = str(check_model(repo, want))
    old_versions = sorted({str(r.version) for r in old if r.version is not None})
    if not force and old_versions == [target] and all(r.state == "READY" for r in old):
        return UpgradeResult(ref, old_versions, target, None, None, [])
    sub = start_service(site, opts)
    assert sub.job_id is not None
    try:
        wait_ready(site, sub.run_dir.path, opts.replicas, timeout=timeout, progress=progress)
    except (SchedulerError, KeyboardInterrupt):
        # Keep the old service; take the half-started new one away.
        stop_records(site, read_records(sub.run_dir.path))
        raise
    new = read_records(sub.run_dir.path)
    got = sorted({str(r.version) for r in new if r.state == EndpointState.READY})
    if got != [target]:
        stop_records(site, new)
        raise ConflictError(f"new replicas serve version(s) {got}, expected {target}")
    stopped = stop_records(site, old)
    wait_stopped(old)
    return UpgradeResult(ref, old_versions, target, str(sub.run_dir.path), sub.job_id, stopped)


def job_state_word(state: JobState) -> str:
    """Short lower-case scheduler state for tables."""
    return state.value.lower()
