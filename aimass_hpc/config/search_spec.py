"""The search spec: what ``aimass search SPEC.toml`` runs.

A TOML file with these tables (only ``[search]``, ``[objective]`` and ``[space]`` are required)::

    [search]
    name = "quadratic"
    sampler = "mcts"           # mcts | random | tpe
    seed = 0                   # omitted: a random seed, journaled so a resume is identical
    direction = "minimize"     # or "maximize"
    metric = "loss"            # the value to optimise (key in the trial's result / metrics)
    budget = 12                # trials in all
    parallel = 3               # trials running at once

    [objective]                # exactly one of `command` or `train`
    command = ["{python}", "objective.py", "--x={x}", "--y={y}"]
    # train = "train_spec.toml"  # a training spec; each trial trains with its params injected

    [space]                    # see aimass_hpc.hpo.space.Space.from_dict
    x = {type = "float", low = -5.0, high = 5.0}
    y = {type = "categorical", choices = ["a", "b"]}

    [trial]                    # resources of each trial job (defaults: 1 task, no GPU)
    nodes = 1
    gpus_per_node = 0
    time = "00:05:00"

    [pruning]                  # optional successive halving from intermediate metrics
    enabled = false

    [driver]                   # the driver's own job when run with --detach
    time = "1-00:00:00"        # default: the partition's MaxTime

A ``command`` objective, and the ``[script] args``/``command`` of a training spec objective,
may use ``{name}`` placeholders for parameters (an inactive conditional parameter becomes an
empty string), ``{trial_id}`` and ``{python}`` (the site's interpreter); ``{{``/``}}`` are
literal braces. Each filled argument stays one argv word. A name that is not a parameter of
``[space]`` is refused when the spec is loaded (``--dry-run`` too). See docs/search.md.
Every trial also gets ``params.json`` in its run directory and the ``AIMASS_TRIAL_PARAMS``
(JSON) and ``AIMASS_TRIAL_ID`` environment variables. Its value is the one it reports through
the runtime API (a result file in the run directory) or else the last line of its output that
parses as a number. Relative paths are relative to the spec file; a command runs in the spec's
directory unless ``objective.workdir`` says otherwise.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import (
    Constraint,
    EnvName,
    MemSize,
    SearchName,
    SlurmName,
    Text,
    check_tree,
)
from aimass_hpc.common.timelimit import check_time
from aimass_hpc.config.job_spec import read_spec_toml
from aimass_hpc.config.site import problems_from_validation

# The placeholder rule lives with the training spec (``aimass train`` must not import the
# search side); the search re-uses it for ``objective.command``.
from aimass_hpc.config.train_spec import (
    command_placeholders,
    fill_placeholders,
)
from aimass_hpc.hpo.space import Space

SAMPLERS = ("mcts", "random", "tpe")
# Placeholders a command may use besides the parameter names.
RESERVED_PLACEHOLDERS = ("trial_id", "python")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSettings(_Model):
    """The ``[search]`` table."""

    name: SearchName = Field(min_length=1, max_length=80, description="names directories")
    sampler: Literal["mcts", "random", "tpe"] = "mcts"
    seed: int | None = Field(None, ge=0, description="omitted: random, journaled")
    direction: Literal["minimize", "maximize"] = "minimize"
    metric: Text = Field("value", min_length=1, description="the value to optimise")
    budget: int = Field(ge=1, le=100_000, description="trials in all")
    parallel: int = Field(1, ge=1, le=10_000, description="trials running at once")
    poll_interval: float = Field(5.0, gt=0, le=3600, description="seconds between status polls")
    max_attempts: int = Field(
        3, ge=1, le=100, description="submissions of one trial whose job was lost"
    )


class Objective(_Model):
    """The ``[objective]`` table: a command, or a training spec."""

    command: list[Text] | None = Field(None, min_length=1)
    train: Text | None = Field(None, min_length=1, description="path to a training spec TOML")
    workdir: Text | None = Field(None, description="cwd of a command; default: the spec's dir")
    env: dict[EnvName, Text] = Field(default_factory=dict)

    @property
    def kind(self) -> Literal["command", "train"]:
        """Which objective this is."""
        return "train" if self.train is not None else "command"


class TrialResources(_Model):
    """The ``[trial]`` table: what each trial job asks for (site defaults fill the rest)."""

    nodes: int = Field(1, ge=1)
    ntasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: MemSize | None = None
    time: Text | None = Field(None, description="Slurm time limit of one trial")
    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraint: Constraint | None = None
    requeue: bool = Field(True, description="let Slurm requeue a preempted trial")
    launcher: Literal["srun", "mpirun", "none"] | None = Field(
        None, description="None: 'none' for a 1-task command, else the site's launcher"
    )

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        return check_time(value)


class Pruning(_Model):
    """The ``[pruning]`` table: successive halving on intermediate metrics (off by default)."""

    enabled: bool = False
    metric: Text | None = Field(None, description="intermediate metric; default: search.metric")
    min_step: int = Field(1, ge=1, description="the first rung (a step count)")
    reduction_factor: int = Field(3, ge=2, description="keep the best 1/eta at each rung")
    min_trials: int = Field(
        0, ge=0, description="trials that must reach a rung before it prunes (0: eta)"
    )


class DriverJob(_Model):
    """The ``[driver]`` table: the driver's own CPU job for ``--detach``."""

    time: Text | None = Field(None, description="default: the partition's MaxTime")
    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    mem: MemSize | None = "1G"

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        return check_time(value)


class SearchSpec(_Model):
    """A whole search spec. ``base_dir`` resolves relative paths (not a TOML key)."""

    search: SearchSettings
    objective: Objective
    space: dict[str, Any]
    trial: TrialResources = Field(default_factory=TrialResources)
    pruning: Pruning = Field(default_factory=Pruning)
    driver: DriverJob = Field(default_factory=DriverJob)
    base_dir: str = Field(".", exclude=True)

    def space_obj(self) -> Space:
        """The validated search space."""
        return Space.from_dict(self.space, where="space")

    @property
    def train_spec_path(self) -> Path | None:
        """Absolute path of the training spec objective, if any."""
        if self.objective.train is None:
            return None
        return _resolve(self.objective.train, self.base_dir)

    @property
    def workdir(self) -> Path:
        """Where a command objective runs."""
        return _resolve(self.objective.workdir or ".", self.base_dir)

    def to_record(self) -> dict[str, Any]:
        """The spec as journaled: relative paths made absolute, so a resume needs no file."""
        data = self.model_dump(mode="json")
        if self.objective.train is not None:
            data["objective"]["train"] = str(self.train_spec_path)
        data["objective"]["workdir"] = str(self.workdir)
        return data


def _resolve(path: str, base: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(base) / p).resolve()


def placeholder_values(
    params: dict[str, Any], names: Sequence[str], *, trial_id: int, python: str
) -> dict[str, Any]:
    """What a trial's placeholders read: every parameter of the space (an inactive
    conditional one as an empty string), ``trial_id`` and ``python``."""
    values: dict[str, Any] = {name: "" for name in names}
    values.update({"trial_id": trial_id, "python": python})
    values.update(params)
    return values


def format_command(
    command: list[str], params: dict[str, Any], *, trial_id: int, python: str
) -> list[str]:
    """``command`` with placeholders filled (inactive conditional parameters: empty)."""
    names = [n for _, n in command_placeholders(command)]
    values = placeholder_values(params, names, trial_id=trial_id, python=python)
    return fill_placeholders(command, values, field="objective.command")


# [trial] keys that override a training spec's [job] table (when set in the search spec).
_TRIAL_TO_TRAIN_JOB = {
    "nodes": "job.nodes",
    "ntasks_per_node": "job.tasks_per_node",
    "gpus_per_node": "job.gpus_per_node",
    "cpus_per_task": "job.cpus_per_task",
    "mem": "job.mem",
    "time": "job.time",
    "partition": "job.partition",
    "account": "job.account",
    "qos": "job.qos",
}


def train_param_key(name: str, has_task: bool) -> str | None:
    """Where parameter ``name`` goes in a training spec (a dotted key), or None (env only).

    A dotted name (``task.args.hidden``) is used as is; a bare name is a ``[train]`` key when
    there is one (``lr``, ``momentum``, ``batch_size``...), else a task argument.
    """
    if "." in name:
        return name
    from aimass_hpc.config.train_spec import TrainSection

    if name in TrainSection.model_fields:
        return f"train.{name}"
    return f"task.args.{name}" if has_task else None


def train_overrides(spec: SearchSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides for ``load_train_spec``: the trial's params and its [trial] resources."""
    path = spec.train_spec_path
    assert path is not None
    try:
        has_task = "task" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        has_task = False
    out: dict[str, Any] = {}
    for field_name in spec.trial.model_fields_set:
        if field_name in _TRIAL_TO_TRAIN_JOB:
            out[_TRIAL_TO_TRAIN_JOB[field_name]] = getattr(spec.trial, field_name)
    for name, value in params.items():
        key = train_param_key(name, has_task)
        if key is not None:
            out[key] = value
    return out


def spec_from_mapping(data: dict[str, Any], *, base_dir: str | Path, where: str) -> SearchSpec:
    """Validate a parsed spec mapping; ``InputError`` names the first bad field."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a table")
    known = [name for name in SearchSpec.model_fields if name != "base_dir"]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise InputError(f"{where}: {key}: unknown table{hint}")
    for key in ("search", "objective", "space"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"{where}: {key}: required table is missing (add a [{key}] table)")
    check_tree(data, label=where)
    obj = data["objective"]
    if isinstance(obj.get("command"), str):
        raise InputError(
            f"{where}: objective.command: give a list of arguments, e.g. "
            '["python3", "objective.py", "--x={x}"] (a string would need shell parsing)'
        )
    try:
        spec = SearchSpec.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        problems = problems_from_validation(exc, SearchSpec)
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{where}: {problems[0]}{more}") from None
    _check_semantics(spec, where)
    return spec


def _check_semantics(spec: SearchSpec, where: str) -> None:
    obj = spec.objective
    if (obj.command is None) == (obj.train is None):
        raise InputError(
            f"{where}: objective: give exactly one of `command` (any program) or `train` "
            "(a training spec)"
        )
    try:
        space = spec.space_obj()
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    clash = [n for n in space.names if n in RESERVED_PLACEHOLDERS]
    if clash:
        raise InputError(f"{where}: space.{clash[0]}: this name is reserved; rename the parameter")
    if obj.command is not None:
        if not obj.command[0]:
            raise InputError(f"{where}: objective.command[0]: the program is empty")
        try:
            placeholders = command_placeholders(obj.command)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        for i, name in placeholders:
            _check_known(name, space.names, f"{where}: objective.command[{i}]")
    train_path = spec.train_spec_path  # None exactly when objective.train is
    if train_path is not None:
        try:
            is_file = train_path.is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            reason = getattr(exc, "strerror", None) or str(exc)
            raise InputError(f"{where}: objective.train: {reason}") from None
        if not is_file:
            raise InputError(f"{where}: objective.train: no such file {train_path}")
        # Every parameter must land on a real key of the training spec: load it with the
        # space's default point injected (validation only; no user code runs).
        import numpy as np

        from aimass_hpc.config.train_spec import load_train_spec

        sample = space.sample(np.random.default_rng(0))
        try:
            train = load_train_spec(train_path, train_overrides(spec, sample))
        except InputError as exc:
            raise InputError(
                f"{where}: objective.train: with the space's parameters: {exc}"
            ) from None
        try:
            found = train.script_placeholders()
        except InputError as exc:
            raise InputError(f"{where}: objective.train: {train_path.name}: {exc}") from None
        for field, name in found:
            _check_known(name, space.names, f"{where}: objective.train: {train_path.name}: {field}")


def _check_known(name: str, names: Sequence[str], where: str) -> None:
    """A placeholder must be a parameter of the space or a reserved name."""
    if name in names or name in RESERVED_PLACEHOLDERS:
        return
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {{{close[0]}}}?" if close else ""
    raise InputError(f"{where}: placeholder {{{name}}} is not a parameter of [space]{hint}")


def load_search_spec(path: str | Path) -> SearchSpec:
    """Read and validate a search spec TOML file."""
    path = Path(path)
    data = read_spec_toml(path, "search spec")
    return spec_from_mapping(data, base_dir=path.resolve().parent, where=str(path))


def spec_from_record(data: dict[str, Any]) -> SearchSpec:
    """The spec as journaled by :meth:`SearchSpec.to_record` (paths already absolute)."""
    return spec_from_mapping(dict(data), base_dir="/", where="journal spec")
