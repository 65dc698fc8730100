"""What a user asks the scheduler for: :class:`JobRequest`, and the generic job spec TOML.

A ``JobRequest`` is scheduler-neutral and site-neutral until :meth:`JobRequest.resolve` checks
it against a :class:`~aimass_hpc.config.site.Site` and fills the site's defaults (partition,
account, QOS, time). Training, search and serving build their own richer specs and turn them into a
``JobRequest`` of their ``kind``; the renderer only ever sees resolved requests.

Generic job spec (``aimass submit hello.toml``)::

    [job]
    name = "hello"
    command = ["python3", "-c", "print('hi')"]
    nodes = 2
    ntasks_per_node = 2
    gpus_per_node = 2
    time = "00:05:00"
    [job.env]
    GREETING = "hello world"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.fsutil import read_user_text
from aimass_hpc.common.names import (
    SBATCH_OPTION,
    SBATCH_VALUE,
    ArrayRange,
    Constraint,
    Dependency,
    EnvName,
    SlurmName,
    Text,
    check_tree,
    shown,
)
from aimass_hpc.common.timelimit import check_time, format_time, parse_time
from aimass_hpc.config.site import Site, _did_you_mean, parse_mem_mb, problems_from_validation

Kind = Literal["job", "train", "trial", "serve"]
Launcher = Literal["srun", "mpirun", "none"]

# Options the tool sets itself: a raw passthrough may not repeat or override them.
CONTROLLED_OPTIONS: dict[str, str] = {
    "--job-name": "name",
    "-J": "name",
    "--nodes": "nodes",
    "-N": "nodes",
    "--ntasks": "nodes/ntasks_per_node",
    "-n": "nodes/ntasks_per_node",
    "--ntasks-per-node": "ntasks_per_node",
    "--cpus-per-task": "cpus_per_task",
    "-c": "cpus_per_task",
    "--gres": "gpus_per_node",
    "--gpus": "gpus_per_node",
    "-G": "gpus_per_node",
    "--gpus-per-node": "gpus_per_node",
    "--gpus-per-task": "gpus_per_node",
    "--mem": "mem",
    "--time": "time",
    "-t": "time",
    "--partition": "partition",
    "-p": "partition",
    "--account": "account",
    "-A": "account",
    "--qos": "qos",
    "-q": "qos",
    "--reservation": "reservation",
    "--dependency": "dependency",
    "-d": "dependency",
    "--array": "array",
    "-a": "array",
    "--requeue": "requeue",
    "--no-requeue": "requeue",
    "--signal": "signal",
    "--output": "(the run directory's logs/)",
    "-o": "(the run directory's logs/)",
    "--error": "(the run directory's logs/)",
    "-e": "(the run directory's logs/)",
    "--open-mode": "(the run directory's logs/)",
    "--chdir": "workdir",
    "-D": "workdir",
    "--constraint": "constraint",
    "-C": "constraint",
    "--wrap": "command",
    "--parsable": "(aimass reads the job id)",
    "--test-only": "(aimass render / --dry-run)",
    "--export": "env",
}


def slurm_job_name(name: str) -> str:
    """The name Slurm sees: ``name`` with anything outside ``[A-Za-z0-9_.+-]`` turned into ``_``.

    The exact name travels in ``AIMASS_JOB_NAME``; Slurm's copy only has to be safe to print
    and to put on an ``#SBATCH`` line.
    """
    safe = re.sub(r"[^A-Za-z0-9_.+\-]", "_", name)[:100].strip("-") or "job"
    return safe


class JobRequest(BaseModel):
    """One batch job to run. Fields left ``None`` take the site's defaults in :meth:`resolve`."""

    model_config = ConfigDict(extra="forbid")

    # The site this request was resolved for (resolve once: a resolved request flows through
    # submit, render and the run directory without being checked again). Not serialised.
    _resolved_for: Site | None = PrivateAttr(default=None)

    kind: Kind = "job"
    name: Text = Field(min_length=1, max_length=1000)
    command: list[Text] = Field(
        min_length=1, description="argv run on every task (or once when launcher is 'none')"
    )
    env: dict[EnvName, Text] = Field(default_factory=dict, description="exported before launch")
    nodes: int = Field(1, ge=1)
    ntasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: Text | None = Field(None, description="per node, Slurm syntax (16G)")
    time: Text | None = Field(None, description="Slurm time limit; None = partition default")
    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    reservation: SlurmName | None = None
    constraint: Constraint | None = Field(None, description="--constraint expression")
    dependency: Dependency | None = Field(None, description="e.g. afterok:123:124")
    array: ArrayRange | None = Field(None, description="e.g. 0-9%2")
    requeue: bool = False
    signal: bool = Field(True, description="warn the job before the end (site preemption)")
    sbatch_extra: list[str] = Field(default_factory=list, description="raw --opt=value items")
    workdir: Text | None = Field(None, description="cwd of the command; None = the run dir")
    launcher: Launcher | None = Field(None, description="None = the site's mpi.launcher")
    mpi: bool = Field(
        True,
        description="start srun's tasks with the site's MPI plugin (mpi.srun_mpi); false for "
        "programs that use no MPI, whose steps then start without the plugin's set-up",
    )
    template_vars: dict[str, Any] = Field(default_factory=dict, description="kind extras")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        return check_time(value)

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str | None) -> str | None:
        if value is not None:
            parse_mem_mb(value)
        return value

    @field_validator("sbatch_extra")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        for item in value:
            check_sbatch_extra(item)
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the program (command[0]) is empty")
        return value

    @field_validator("template_vars")
    @classmethod
    def _template_vars(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            check_tree(value, "template_vars")
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return value

    # ------------------------------------------------------------------ resolution

    @property
    def slurm_name(self) -> str:
        """The sanitised name Slurm shows (see :func:`slurm_job_name`)."""
        return slurm_job_name(self.name)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; one with changed fields must be resolved (checked) again."""
        copy = super().model_copy(update=update, deep=deep)
        if update:
            copy._resolved_for = None
        return copy

    def resolve(self, site: Site) -> JobRequest:
        """Check against ``site`` and fill its defaults; raises ``InputError`` naming the field.

        Defaults: partition (the kind's partition from ``[training]``/``[search]``/``[serving]``,
        else the site default), time (the partition's ``default_time``), account and QOS
        (partition, then site), constraints, launcher (``mpi.launcher``) and, for ``serve``,
        the site's default reservation. Idempotent: resolving a resolved request changes
        nothing, and costs nothing when it was resolved for the same site object.
        """
        if self._resolved_for is site:
            return self
        kind_default = {
            "train": site.training.partition,
            "trial": site.search.partition,
            "serve": site.serving.partition,
        }.get(self.kind)
        part = site.partition(self.partition or kind_default)  # InputError("partition: ...")
        updates: dict[str, Any] = {"partition": part.name}
        if self.kind == "serve" and self.reservation is None:
            updates["reservation"] = site.serving.default_reservation
        if self.kind == "train" and not self.gpus_per_node and part.gpus_per_node:
            cpu_parts = [n for n, p in site.partitions.items() if not p.gpus_per_node]
            if cpu_parts:  # a site with only GPU partitions (dev) may train on CPUs there
                raise InputError(
                    f"partition: CPU-only training (gpus_per_node = 0) on GPU partition "
                    f"{part.name!r}; use partition {cpu_parts[0]!r} or ask for GPUs"
                )
        if self.gpus_per_node > part.gpus_per_node:
            # A GPU job on a CPU partition: name where GPUs are.
            gpu_parts = [n for n, p in site.partitions.items() if p.gpus_per_node]
            elsewhere = (
                f"; use a GPU partition ({', '.join(gpu_parts)})"
                if gpu_parts and not part.gpus_per_node
                else ""
            )
            raise InputError(
                f"gpus_per_node: {self.gpus_per_node} GPUs per node asked, partition "
                f"{part.name!r} nodes have {part.gpus_per_node}{elsewhere}"
            )
        if part.nodes is not None and self.nodes > part.nodes:
            raise InputError(
                f"nodes: {self.nodes} nodes asked, partition {part.name!r} has {part.nodes}"
            )
        cpus_per_task = self.cpus_per_task or part.default_cpus_per_task
        updates["cpus_per_task"] = cpus_per_task
        cpus = (cpus_per_task or 1) * self.ntasks_per_node
        if cpus > part.cpus_per_node:
            raise InputError(
                f"cpus_per_task: {self.ntasks_per_node} tasks x {cpus_per_task or 1} CPUs "
                f"per node asked, partition {part.name!r} nodes have {part.cpus_per_node}"
            )
        mem = self.mem or part.default_mem
        updates["mem"] = mem
        if mem is not None and part.mem_mb is not None and parse_mem_mb(mem) > part.mem_mb:
            raise InputError(
                f"mem: {mem} per node asked, partition {part.name!r} nodes have {part.mem_per_node}"
            )
        time = self.time or part.default_time
        if time is not None:
            seconds = parse_time(time)
            limit = part.max_seconds
            if limit is not None and (seconds is None or seconds > limit):
                raise InputError(
                    f"time: {time} is over partition {part.name!r}'s limit {part.max_time}"
                )
            updates["time"] = format_time(seconds)
        updates["account"] = self.account or part.account or site.account
        updates["qos"] = self.qos or part.qos or site.qos
        # The job's constraint, else the partition's, else the site's (partition replaces site).
        default_features = part.constraints or site.constraints
        if self.constraint is None and default_features:
            updates["constraint"] = "&".join(default_features)
        launcher = self.launcher or site.mpi.launcher
        if site.container_for(part).runtime == "pyxis" and launcher != "srun":
            raise InputError(f"launcher: {launcher!r} cannot start pyxis containers; use 'srun'")
        if site.scheduler == "local" and launcher == "srun":
            raise InputError("launcher: the local scheduler has no srun; use 'none' or 'mpirun'")
        updates["launcher"] = launcher
        if self.requeue and site.preemption.max_restarts == 0:
            raise InputError(
                f"requeue: site {site.name!r} allows no restarts (preemption.max_restarts = 0)"
            )
        resolved = self.model_copy(update=updates)
        resolved._resolved_for = site
        return resolved


def with_sbatch_extra(
    request: JobRequest, items: list[str] | tuple[str, ...], site: Site, where: str = "sbatch_extra"
) -> JobRequest:
    """``request`` with raw sbatch options ``items`` added after its own, resolved for
    ``site``; a bad item is an ``InputError`` naming ``where`` (e.g. ``--sbatch-arg``)."""
    if not items:
        return request
    for item in items:
        try:
            check_sbatch_extra(item)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
    extra = list(request.sbatch_extra) + list(items)
    return request.model_copy(update={"sbatch_extra": extra}).resolve(site)


def check_sbatch_extra(item: str) -> str:
    """Validate one raw sbatch option (``--opt`` or ``--opt=value``); returns it unchanged."""
    if not isinstance(item, str) or not item.startswith("--") or len(item) < 3:
        raise ValueError(f"{shown(item)}: give long options as --name=value")
    option, _, value = item.partition("=")
    if option in CONTROLLED_OPTIONS:
        raise ValueError(
            f"{option} is set by aimass (use the {CONTROLLED_OPTIONS[option]!s} field instead)"
        )
    if not SBATCH_OPTION.matches(option):
        raise ValueError(f"{shown(option)} is not an sbatch option name")
    if not SBATCH_VALUE.matches(value):
        raise ValueError(
            f"{shown(item)}: the value has characters that cannot go on an #SBATCH line "
            f"(allowed: {SBATCH_VALUE.allowed})"
        )
    return item


_SBATCH_LINE_RE = re.compile(r"^#SBATCH\s+(-{1,2}[A-Za-z][\w-]*)(?:[=\s]\s*(\S+))?")


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH`` options at the top of a script (``--opt`` -> value or "")."""
    options: dict[str, str] = {}
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        match = _SBATCH_LINE_RE.match(line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


# ------------------------------------------------------------------ generic job spec files


def read_spec_toml(path: Path, what: str = "spec file") -> dict[str, Any]:
    """The table in TOML file ``path``; a missing or malformed file is one InputError line."""
    text = read_user_text(path, what)  # a FIFO, a directory, non-UTF-8: one line
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None


def load_job_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobRequest:
    """Read a generic job spec TOML (a ``[job]`` table) into a :class:`JobRequest`.

    ``overrides`` (e.g. from CLI flags) replace keys of the table. Errors name the key path.
    """
    path = Path(path)
    data = read_spec_toml(path)
    unknown = [key for key in data if key != "job"]
    if unknown:
        raise InputError(
            f"{path}: {unknown[0]}: unknown table{_did_you_mean(unknown[0], ['job'])} "
            "(a job spec has one [job] table)"
        )
    table = data.get("job")
    if not isinstance(table, dict):
        raise InputError(f"{path}: job: required table is missing (add a [job] table)")
    return request_from_mapping({**table, **(overrides or {})}, where=f"{path}: job")


def request_from_mapping(data: dict[str, Any], where: str = "job") -> JobRequest:
    """Validate a mapping into a :class:`JobRequest`; ``InputError`` names the first bad key."""
    if isinstance(data.get("command"), str):
        raise InputError(
            f'{where}.command: give a list of arguments, e.g. ["bash", "-c", "..."] '
            "(a string would need shell parsing)"
        )
    check_tree(data, where)
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation(exc, JobRequest)
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        first = problems[0]
        raise InputError(f"{where}.{first}{more}") from None
