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

A service started with ``supervise`` (or autoscaling) also gets a supervisor job
(:mod:`aimass_hpc.launch.service_supervisor`) that converges the run directory to its
``desired.json``; ``stop`` stops it first (and marks the run directory ``serve.stop``, which a
replica's handover honours), then the replicas, then any job still queued from the run dir.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError
from aimass_hpc.common.fsutil import append_line, atomic_write_json, atomic_write_text, read_json
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
    STOP_MARKER,
    EndpointRecord,
    EndpointState,
    find_records,
    now_iso,
    read_records,
    write_record,
)

# A supervised service's files in its run directory (see launch/service_supervisor.py).
DESIRED_FILE = "desired.json"  # what the supervisor converges to (written atomically)
DECISIONS_FILE = "decisions.jsonl"  # the supervisor's decisions, append-only
SUPERVISOR_FILE = "supervisor.json"  # the supervisor's job id and heartbeat
SUPERVISOR_RUNS = "supervisor"  # run directories of the supervisor's own jobs

CHECK_INTERVAL_S = DEFAULTS.check_interval_s  # the supervisor's seconds between rounds
CHECK_FAILURES = DEFAULTS.check_failures  # failed checks in a row before a replacement

# Scheduler states that mean the job is over but ended badly.
_BAD_ENDS = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "TIMEOUT"}


@dataclass
class Autoscale:
    """Scale a supervised service on ongoing requests per replica (Ray Serve's defaults)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing: float = DEFAULTS.autoscale_target_ongoing  # ongoing requests per replica
    upscale_delay_s: float = DEFAULTS.upscale_delay_s  # the need lasts this long: add replicas
    downscale_delay_s: float = DEFAULTS.downscale_delay_s  # the slack lasts this long: remove

    def check(self) -> None:
        """InputError naming the option that makes no sense."""
        if self.min_replicas < 1:
            raise InputError("--min-replicas: must be at least 1")
        if self.max_replicas < self.min_replicas:
            raise InputError(
                f"--max-replicas {self.max_replicas}: below --min-replicas {self.min_replicas}"
            )
        if self.target_ongoing <= 0:
            raise InputError("--target-ongoing: must be above 0")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise InputError("--upscale-delay/--downscale-delay: must not be negative")


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
    supervise: bool = False  # start a supervisor job beside the replicas
    check_interval_s: float = CHECK_INTERVAL_S  # the supervisor's seconds between checks
    check_failures: int = CHECK_FAILURES  # failed checks in a row before a replacement
    autoscale: Autoscale | None = None  # scale between min and max replicas (supervised)
    engine: str = "torch"  # torch: the built-in server; vllm: HF causal LMs through vLLM
    vllm: dict[str, Any] | None = None  # the site's [serving.vllm], resolved (engine vllm)

    def serve_section(self, repo: str, version: int | None) -> dict[str, Any]:
        """The ``spec.serve`` payload the replicas read."""
        engine: dict[str, Any] = {}
        if self.engine != "torch":
            engine = {"engine": self.engine, "vllm": self.vllm, "gpus": self.gpus}
        return {
            **engine,
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


def check_model(repo: str, ref: str | Ref, engine: str = "torch") -> int:
    """The version ``ref`` names now; refuses a model whose recipe ``engine`` cannot serve."""
    from aimass_hpc.repo import ModelRepository

    version = ModelRepository(repo).get(ref)
    if engine == "vllm":
        from aimass_hpc.repo.hf import check_hf

        check_hf(version)
        return int(version.number)
    from aimass_hpc.serve.model_loader import parse_recipe

    parse_recipe(version.recipe, where=f"model {version.ref} recipe")
    return int(version.number)


ENGINES = ("torch", "vllm")


def vllm_settings(site: Site) -> dict[str, Any]:
    """The site's ``[serving.vllm]`` for the replicas: a relative ``python`` resolved against
    the site file's folder. ``InputError`` when the site has none."""
    cfg = site.serving.vllm
    if cfg is None:
        raise InputError(
            f"--engine vllm: site {site.name!r} has no [serving.vllm] table "
            "(python, module or container; see site_configs/dev.toml)"
        )
    out = cfg.model_dump()
    if cfg.python and not Path(cfg.python).is_absolute() and "/" in cfg.python:
        base = site.source_dir or Path.cwd()
        out["python"] = str((base / cfg.python).resolve())
    return out


def plan_service(site: Site, opts: ServeOptions) -> tuple[JobRequest, dict[str, Any]]:
    """The job request and the ``spec`` payload for ``opts`` (checks the model first)."""
    if opts.replicas < 1:
        raise InputError("replicas: must be at least 1")
    if opts.autoscale is not None:
        opts.autoscale.check()
        opts.supervise = True  # the supervisor does the scaling
        opts.replicas = min(
            max(opts.replicas, opts.autoscale.min_replicas), opts.autoscale.max_replicas
        )
    check_serve_options(opts)
    if opts.engine not in ENGINES:
        raise InputError(f"--engine {opts.engine!r}: use one of {', '.join(ENGINES)}")
    repo = str(Path(opts.repo).expanduser()) if opts.repo else str(site.models_root)
    version = check_model(repo, opts.ref, opts.engine)
    name = Ref.parse(opts.ref).name
    threads = opts.threads or max(1, opts.cpus - 1)
    entry = "aimass_hpc.serve"
    if opts.engine == "vllm":
        opts.vllm = vllm_settings(site)
        entry = "aimass_hpc.serve.vllm_replica"
    request = request_from_mapping(
        {
            "kind": "serve",
            "name": f"serve-{name}",
            "command": [site.python, "-m", entry],
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
                message="submitted",
                engine=None if opts.engine == "torch" else opts.engine,
            ),
            message="submitted by serve start",
        )
    write_desired(run_dir, opts)
    if opts.supervise:
        start_supervisor(site, run_dir, opts)
    return sub


# -- desired state, stop marker, supervisor job --------------------------------------------


def write_desired(run_dir: Path, opts: ServeOptions, *, state: str = "running") -> dict[str, Any]:
    """Write ``desired.json``: the model, the replica count, the options (atomically)."""
    doc = {
        "state": state,
        "model": opts.ref,
        "replicas": opts.replicas,
        "supervise": opts.supervise,
        "options": {
            "gpus": opts.gpus, "cpus": opts.cpus, "time": opts.time,
            "reservation": opts.reservation, "partition": opts.partition,
        },
        "supervisor": {
            "interval_s": opts.check_interval_s, "failures": opts.check_failures,
        },
        "autoscale": asdict(opts.autoscale) if opts.autoscale else None,
        "updated": now_iso(),
    }  # fmt: skip
    atomic_write_json(Path(run_dir) / DESIRED_FILE, doc)
    return doc


def read_desired(run_dir: str | Path) -> dict[str, Any] | None:
    """``desired.json`` of a service, None when there is none (or it is unreadable)."""
    try:
        doc = read_json(Path(run_dir) / DESIRED_FILE)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def set_desired(run_dir: str | Path, **changes: Any) -> dict[str, Any] | None:
    """Change keys of ``desired.json`` (state, replicas, model); None when there is none."""
    doc = read_desired(run_dir)
    if doc is None:
        return None
    doc.update(changes, updated=now_iso())
    atomic_write_json(Path(run_dir) / DESIRED_FILE, doc)
    return doc


def record_decision(run_dir: str | Path, action: str, why: str, **details: Any) -> dict[str, Any]:
    """Append one decision (``at``, ``action``, ``why``, details) to ``decisions.jsonl``."""
    import json

    entry = {"at": now_iso(), "action": action, "why": why, **details}
    append_line(Path(run_dir) / DECISIONS_FILE, json.dumps(entry, default=str))
    return entry


def read_decisions(run_dir: str | Path, last: int | None = None) -> list[dict[str, Any]]:
    """The supervisor's decisions, oldest first (the ``last`` N with ``last``)."""
    from aimass_hpc.common.fsutil import read_json_lines

    path = Path(run_dir) / DECISIONS_FILE
    if not path.exists():
        return []
    rows = [r for r in read_json_lines(path) if isinstance(r, dict)]
    return rows[-last:] if last else rows


def supervisor_request(site: Site, run_dir: Path, opts: ServeOptions) -> JobRequest:
    """The supervisor's batch job: one CPU running ``python -m
    aimass_hpc.launch.service_supervisor RUN_DIR``; it requeues itself before its time limit."""
    name = Ref.parse(opts.ref).name
    command = [site.python, "-m", "aimass_hpc.launch.service_supervisor", str(run_dir)]
    if site.source:
        command += ["--site", str(site.source)]
    return request_from_mapping(
        {
            "kind": "job",
            "name": f"supervise-{name}",
            "command": command,
            "env": {"AIMASS_SERVICE_SUPERVISOR": "1", "OMP_NUM_THREADS": "1"},
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": 1,
            "time": opts.time,
            "partition": opts.partition or site.serving.partition,
            "requeue": site.preemption.max_restarts > 0,
            "signal": True,
            "launcher": "none",
            "workdir": str(run_dir),
        },
        where="serve.supervisor",
    )


def start_supervisor(site: Site, run_dir: Path, opts: ServeOptions) -> Submission:
    """Submit the supervisor job of the service in ``run_dir``; remembers its job id."""
    sub = submit(
        site,
        supervisor_request(site, Path(run_dir), opts),
        spec={"service_run_dir": str(run_dir), "role": "service supervisor"},
        runs_root=Path(run_dir) / SUPERVISOR_RUNS,
    )
    atomic_write_json(
        Path(run_dir) / SUPERVISOR_FILE,
        {"job_id": sub.job_id, "run_dir": str(sub.run_dir.path), "submitted": now_iso()},
    )
    record_decision(run_dir, "supervisor-started", "serve start --supervise", job_id=sub.job_id)
    return sub


def read_supervisor(run_dir: str | Path) -> dict[str, Any] | None:
    """``supervisor.json`` (job id, heartbeat, counters), None when not supervised."""
    try:
        doc = read_json(Path(run_dir) / SUPERVISOR_FILE)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def mark_stopping(run_dir: str | Path) -> None:
    """Say the service of ``run_dir`` is being stopped: ``serve.stop`` (handovers and the
    supervisor start nothing more) and desired state ``stopped``."""
    atomic_write_text(Path(run_dir) / STOP_MARKER, now_iso() + "\n")
    set_desired(run_dir, state="stopped")


def stop_supervisor(site: Site, run_dir: str | Path) -> list[str]:
    """Cancel the supervisor job of ``run_dir`` if it is still there; returns its id."""
    doc = read_supervisor(run_dir)
    job_id = str(doc.get("job_id") or "") if doc else ""
    if not job_id:
        return []
    scheduler = get_scheduler(site)
    try:
        st = scheduler.status([job_id]).get(job_id)
        if st is not None and not st.is_terminal:
            scheduler.cancel([job_id])
            record_decision(run_dir, "supervisor-stopped", "serve stop", job_id=job_id)
            return [job_id]
    except (SchedulerError, NotFoundError):
        pass
    return []


def sweep_run_dir(site: Site, run_dir: str | Path) -> list[str]:
    """Cancel every job still queued or running from ``run_dir``'s own script -- also one a
    handover or the supervisor submitted that has no record yet. Returns the ids cancelled."""
    scheduler = get_scheduler(site)
    try:
        ids = scheduler.find_jobs_for_run(run_dir)
        if not ids:
            return []
        statuses = scheduler.status(ids)
        active = [i for i in ids if i in statuses and not statuses[i].is_terminal]
        if active:
            scheduler.cancel(active)
        return active
    except (SchedulerError, NotFoundError):
        return []  # cannot ask: the records' jobs were cancelled already


def stop_service(
    site: Site,
    records: Iterable[EndpointRecord],
    *,
    wait: bool = True,
    timeout: float = DEFAULTS.stop_timeout_s,
) -> list[str]:
    """Stop the services ``records`` belong to, race-free against a handover's sbatch:

    1. ``serve.stop`` in each run directory (a handover checks it before and after its sbatch),
    2. the supervisor job (so it replaces nothing),
    3. the records' jobs, read again *after* step 1 (a successor written meanwhile is seen),
    4. any job still queued from the run directory's script (one with no record yet),
       once now and once more after the drain.
    """
    run_dirs = sorted({r.run_dir for r in records})
    cancelled: list[str] = []
    for d in run_dirs:
        mark_stopping(d)
    for d in run_dirs:
        cancelled += stop_supervisor(site, d)
    live = [
        r for d in run_dirs for r in reconcile(site, read_records(d))
        if EndpointState(r.state) not in FINAL_STATES
    ]  # fmt: skip
    cancelled += stop_records(site, live)
    for d in run_dirs:
        cancelled += sweep_run_dir(site, d)
    if wait:
        wait_stopped(live, timeout)
        for d in run_dirs:
            cancelled += sweep_run_dir(site, d)
            reconcile(site, read_records(d))
    tasks = {j.split("_", 1)[0] for j in cancelled if "_" in j}
    # An array's id next to its own task ids says nothing more: show the tasks.
    return sorted({j for j in cancelled if "_" in j or j not in tasks})


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
        "max_wait_ms", "batching", "threads", "handover", "engine", "vllm", "gpus",
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
        engine=str(serve.get("engine") or "torch"),
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
    # A supervised service stays supervised: the new run dir gets its own supervisor.
    opts.supervise = any(read_supervisor(d) is not None for d in run_dirs)
    desired = read_desired(run_dirs[-1]) or {}
    if isinstance(desired.get("autoscale"), dict):  # keep scaling, from today's replica count
        opts.autoscale = Autoscale(**desired["autoscale"])
        opts.replicas = int(desired.get("replicas") or opts.replicas)
    if isinstance(desired.get("supervisor"), dict):
        opts.check_interval_s = float(desired["supervisor"].get("interval_s", CHECK_INTERVAL_S))
        opts.check_failures = int(desired["supervisor"].get("failures", CHECK_FAILURES))
    repo = opts.repo or str(site.models_root)
    target = str(check_model(repo, want, opts.engine))
    old_versions = sorted({str(r.version) for r in old if r.version is not None})
    if not force and old_versions == [target] and all(r.state == "READY" for r in old):
        return UpgradeResult(ref, old_versions, target, None, None, [])
    sub = start_service(site, opts)
    assert sub.job_id is not None
    try:
        wait_ready(site, sub.run_dir.path, opts.replicas, timeout=timeout, progress=progress)
    except (SchedulerError, KeyboardInterrupt):
        # Keep the old service; take the half-started new one away.
        stop_service(site, read_records(sub.run_dir.path), wait=False)
        raise
    new = read_records(sub.run_dir.path)
    got = sorted({str(r.version) for r in new if r.state == EndpointState.READY})
    if got != [target]:
        stop_service(site, new, wait=False)
        raise ConflictError(f"new replicas serve version(s) {got}, expected {target}")
    for d in run_dirs:  # the old supervisors must not replace the replicas drained now
        mark_stopping(d)
        stop_supervisor(site, d)
    stopped = stop_records(site, old)
    wait_stopped(old)
    for d in run_dirs:
        stopped += [j for j in sweep_run_dir(site, d) if j not in stopped]
    return UpgradeResult(ref, old_versions, target, str(sub.run_dir.path), sub.job_id, stopped)


def job_state_word(state: JobState) -> str:
    """Short lower-case scheduler state for tables."""
    return state.value.lower()


# -- serve status ---------------------------------------------------------------------------


def service_run_dirs(site: Site, target: str) -> list[Path]:
    """The run directories ``target`` names: a run directory itself, or the live services of
    a model reference (else its newest one); ``NotFoundError`` when there is none."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "spec.json").is_file():
            raise NotFoundError(f"{target}: not a service run directory (no spec.json)")
        return [path.resolve()]
    records = find_records(site.runs_root, target)
    if not records:
        raise NotFoundError(f"no service for {target!r} under {site.runs_root}")
    live = sorted({r.run_dir for r in records if EndpointState(r.state) not in FINAL_STATES})
    if live:
        return [Path(d) for d in live]
    newest = max(records, key=lambda r: r.started)
    return [Path(newest.run_dir)]


def service_status(site: Site, run_dir: Path, *, decisions: int = 10) -> dict[str, Any]:
    """Desired vs actual replicas of one service, its supervisor and its last decisions."""
    records = reconcile(site, read_records(run_dir))
    desired = read_desired(run_dir)
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.state] = counts.get(rec.state, 0) + 1
    sup = read_supervisor(run_dir)
    sup_state = None
    if sup and sup.get("job_id"):
        try:
            st = get_scheduler(site).status([str(sup["job_id"])]).get(str(sup["job_id"]))
            sup_state = st.state.value if st is not None else None
        except (SchedulerError, NotFoundError):
            sup_state = "unknown"
    try:
        want_replicas: int | None = int((desired or {}).get("replicas"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        want_replicas = None
    return {
        "run_dir": str(run_dir),
        "model": (desired or {}).get("model") or (records[0].model_ref if records else None),
        "desired_state": (desired or {}).get("state", "running"),
        "desired_replicas": want_replicas,
        "ready_replicas": counts.get("READY", 0),
        "coming_replicas": counts.get("PENDING", 0) + counts.get("LOADING", 0),
        "states": counts,
        "stopping": (run_dir / STOP_MARKER).exists(),
        "supervisor": {**(sup or {}), "state": sup_state} if sup else None,
        "replicas": [
            {
                "replica": r.replica,
                "job_id": r.job_id,
                "state": r.state,
                "url": r.url,
                "version": r.version,
                "fenced": r.fenced,
                "history": r.history,
            }
            for r in records
        ],  # fmt: skip
        "decisions": read_decisions(run_dir, decisions),
    }
