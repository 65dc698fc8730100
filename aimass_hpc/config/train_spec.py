"""Training specs: what ``aimass train SPEC.toml`` reads, checked on the login node.

A spec names the workload as a **task** for the built-in trainer or as a **script** (or any
**command**) run on every rank, plus hyperparameters, the repository model name and the job's
shape::

    name = "digits"
    backend = "torch"                 # optional; the site's training.backend otherwise

    [task]
    ref = "digits_mlp:build"          # module:function, found next to the spec or on sys.path
    args = { hidden = 64 }

    [train]
    optimizer = "sgd"                 # sgd | adam | adamw
    lr = 0.1
    momentum = 0.9
    batch_size = 64                   # global batch, split evenly over the ranks
    epochs = 10                       # or steps = 500
    seed = 0
    checkpoint_every = 20             # steps; 0 = only at the end and on preemption

    [model]
    name = "digits-mlp"               # repository model name

    [job]
    nodes = 2
    tasks_per_node = 2                # CPU ranks per node; with GPUs one task per GPU
    gpus_per_node = 0
    time = "00:10:00"

Validation never imports user code or torch: the task module is located with import
machinery finders (no parent package is executed) and its source parsed with ``ast``.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import (
    ClassName,
    Constraint,
    EnvName,
    MemSize,
    ModelName,
    SlurmName,
    TaskRef,
    Text,
    check_tree,
    shown,
)
from aimass_hpc.config.job_spec import JobRequest, read_spec_toml, request_from_mapping
from aimass_hpc.config.site import Site, problems_from_validation
from aimass_hpc.runtime.config import CONFIG_FILE, RunConfig, TrainParams

Backend = Literal["torch", "horovod", "fsdp"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSection(_Strict):
    """``[task]``: the built-in trainer's task function and its keyword arguments."""

    ref: TaskRef = Field(description="module:function")
    args: dict[str, Any] = Field(default_factory=dict)


class ScriptSection(_Strict):
    """``[script]``: a Python script (``path``) or any program (``command``) on every rank."""

    path: Text | None = None
    args: list[Text] = Field(default_factory=list)
    command: list[Text] | None = None

    @model_validator(mode="after")
    def _one(self) -> ScriptSection:
        if (self.path is None) == (self.command is None):
            raise ValueError("give exactly one of path (a Python script) or command (a program)")
        if self.command is not None and (not self.command or not self.command[0]):
            raise ValueError("command: give the program and its arguments as a list")
        return self


class TrainSection(_Strict):
    """``[train]``: hyperparameters of the built-in trainer (see ``TrainParams``)."""

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1, description="global batch (all ranks together)")
    epochs: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0, description="steps; 0 = end and preemption only")
    keep_checkpoints: int | None = Field(
        None, ge=1, description="newest checkpoints of the run kept; default the site's"
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fsdp_wrap: list[ClassName] = Field(
        default_factory=list,
        description="backend fsdp: module class names sharded as units (default: every "
        "module holding parameters)",
    )
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="backend fsdp: bf16 compute, fp32 reductions (auto: on GPUs)"
    )
    activation_checkpointing: bool = Field(False, description="backend fsdp: recompute")
    cpu_offload: bool = Field(False, description="backend fsdp: shards kept on the CPU")
    async_checkpoint: bool = Field(
        False, description="write checkpoints in the background (the loop waits for a snapshot)"
    )


class ModelSection(_Strict):
    """``[model]``: where the checkpoints and the final model go."""

    name: ModelName = Field(
        description="the repository's model name rule (aimass_hpc.common.names)"
    )
    repository: Text | None = Field(None, description="default: the site's filesystems.models")
    tags: list[Text] = Field(default_factory=list)


class JobSection(_Strict):
    """``[job]``: the allocation. With GPUs, one task per GPU."""

    nodes: int = Field(1, ge=1)
    tasks_per_node: int | None = Field(None, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: MemSize | None = None
    time: Text | None = None
    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    reservation: SlurmName | None = None
    constraint: Constraint | None = Field(None, description="--constraint expression")
    sbatch_extra: list[str] = Field(default_factory=list, description="raw --opt=value items")
    env: dict[EnvName, Text] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpu_tasks(self) -> JobSection:
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"tasks_per_node: {self.tasks_per_node} tasks with {self.gpus_per_node} GPUs "
                "per node; training runs one task per GPU (leave tasks_per_node out)"
            )
        return self

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


class TrainSpec(_Strict):
    """A whole training spec (``aimass train SPEC.toml``)."""

    name: Text | None = Field(None, min_length=1, max_length=100)
    backend: Backend | None = None
    pythonpath: list[Text] = Field(default_factory=list, description="relative to the spec")
    task: TaskSection | None = None
    script: ScriptSection | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    model: ModelSection
    job: JobSection = Field(default_factory=JobSection)
    # Not TOML keys: where the spec came from (set by load_train_spec).
    source: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _workload(self) -> TrainSpec:
        if (self.task is None) == (self.script is None):
            raise ValueError("give exactly one of a [task] table or a [script] table")
        if self.task is not None and self.train.batch_size % self.job.world_size:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} is not divisible by the "
                f"{self.job.world_size} ranks ({self.job.nodes} nodes x "
                f"{self.job.ntasks_per_node} tasks); it is the global batch"
            )
        return self

    # ---------------------------------------------------------------- derived values

    @property
    def base_dir(self) -> Path:
        """The spec file's directory (relative paths in the spec are relative to it)."""
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    @property
    def run_name(self) -> str:
        return self.name or self.model.name

    def search_paths(self) -> list[str]:
        """Directories the job puts first on ``sys.path``: the spec's dir, then ``pythonpath``."""
        paths = [str(self.base_dir)]
        for entry in self.pythonpath:
            p = Path(entry).expanduser()
            paths.append(str(p if p.is_absolute() else (self.base_dir / p).resolve()))
        return paths

    def script_path(self) -> Path | None:
        if self.script is None or self.script.path is None:
            return None
        p = Path(self.script.path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def resolved_backend(self, site_default: str) -> str:
        return self.backend or site_default

    def to_run_config(
        self,
        *,
        run_dir: str | None,
        repository: str | None,
        backend: str,
        warning_signal: str,
        max_restarts: int,
    ) -> RunConfig:
        """The job's ``train.json`` content for this spec."""
        script = self.script_path()
        return RunConfig(
            run_dir=run_dir,
            backend=backend,
            task=self.task.ref if self.task else None,
            task_args=dict(self.task.args) if self.task else {},
            script=str(script) if script else None,
            script_args=list(self.script.args) if self.script else [],
            train=TrainParams(**self.train.model_dump(exclude={"keep_checkpoints"})),
            keep_checkpoints=self.train.keep_checkpoints,
            model_name=self.model.name,
            repository=repository,
            tags=list(self.model.tags),
            warning_signal=warning_signal,
            max_restarts=max_restarts,
            pythonpath=self.search_paths(),
            spec=self.model_dump(mode="json", exclude_none=True),
            spec_path=str(Path(self.source).resolve()) if self.source else None,
        )

    def command(self, python: str) -> list[str]:
        """What ``srun`` starts on every rank."""
        if self.task is not None:
            return [python, "-m", "aimass_hpc.runtime", "train"]
        assert self.script is not None
        if self.script.command is not None:
            return list(self.script.command)
        return [python, "-m", "aimass_hpc.runtime", "run", str(self.script_path()),
                *self.script.args]  # fmt: skip

    def script_placeholders(self) -> list[tuple[str, str]]:
        """``(field, name)`` of every ``{name}`` in ``[script] args`` and ``command``
        (``field`` like ``script.args[1]``); malformed braces are an ``InputError``."""
        out: list[tuple[str, str]] = []
        if self.script is None:
            return out
        for key in ("args", "command"):
            items = getattr(self.script, key) or []
            out += [
                (f"script.{key}[{i}]", n) for i, n in command_placeholders(items, f"script.{key}")
            ]
        return out

    def fill_script(self, values: dict[str, Any] | None) -> TrainSpec:
        """The spec with ``{name}`` placeholders of ``[script] args``/``command`` filled from
        ``values`` (a search trial's parameters) and ``{{``/``}}`` made single braces.

        ``values=None`` is a plain ``aimass train``: there are no parameters, so any
        placeholder is an ``InputError`` naming the field (write ``{{`` for a literal brace).
        """
        if self.script is None:
            return self
        if values is None:
            found = self.script_placeholders()
            if found:
                field, name = found[0]
                raise InputError(
                    f"{field}: placeholder {{{name}}} has no value: placeholders are "
                    "filled only by `aimass search` with a trial's parameters (write {{ and }} "
                    "for literal braces)"
                )
            values = {}
        args = fill_placeholders(self.script.args, values, field="script.args")
        update: dict[str, Any] = {"args": args}
        if self.script.command is not None:
            update["command"] = fill_placeholders(
                self.script.command, values, field="script.command"
            )
        return self.model_copy(update={"script": self.script.model_copy(update=update)})

    # ---------------------------------------------------------------- checks

    def check_workload(self) -> None:
        """Task ref resolvable and script present; raises InputError naming the field."""
        if self.task is not None:
            check_task_ref(self.task.ref, self.search_paths(), self.task.args)
        script = self.script_path()
        if script is not None and not script.is_file():
            raise InputError(f"script.path: {script} does not exist")


# --------------------------------------------------------------------------- placeholders
# ``{name}`` in an argument list, filled with a search trial's parameters. One rule for a
# search's ``objective.command`` and a training spec's ``[script] args``/``command``.


# A placeholder is ``{name}``, ``{name:spec}`` or ``{name!r}`` with a parameter-shaped name.
# Every other brace is the script's own: ``${VAR}`` and ``${VAR:-x}`` (shell parameter
# expansion), ``{a,b}`` (brace expansion), ``{print $1}`` (awk) pass through unchanged;
# ``{{``/``}}`` are the escape for a literal brace around something that looks like a name.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:!([rsa]))?(?::([^{}]*))?\}")


_UNCLOSED = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?:![rsa])?(?::[^{}]*)?$")


def _split_placeholders(
    arg: str, where: str = "argument"
) -> list[tuple[str, str | None, str, str | None]]:
    """``arg`` as ``(literal, name, spec, conversion)`` pieces (name None: literal only).

    A ``{name`` left open at the end of ``arg`` is a typo, not shell code: an InputError
    naming ``where``.
    """
    out: list[tuple[str, str | None, str, str | None]] = []
    literal: list[str] = []
    i = 0
    while i < len(arg):
        two = arg[i : i + 2]
        if two in ("{{", "}}"):
            literal.append(two[0])
            i += 2
            continue
        if two == "${" and arg[i + 2 : i + 3] != "{":
            # shell parameter expansion, nested ones included: not ours ("${{X}}", the
            # escaped spelling str.format needed, still means ${X})
            depth, j = 0, i + 1
            while j < len(arg):
                depth += {"{": 1, "}": -1}.get(arg[j], 0)
                j += 1
                if depth == 0:
                    break
            literal.append(arg[i:j])
            i = j
            continue
        found = _PLACEHOLDER.match(arg, i) if arg[i] == "{" else None
        if found is None and arg[i] == "{" and _UNCLOSED.match(arg, i):
            raise InputError(
                f"{where}: bad placeholder in {shown(arg)}: {shown(arg[i:], 40)} is not "
                "closed (use {{ and }} for literal braces)"
            )
        if found is None:
            literal.append(arg[i])
            i += 1
            continue
        out.append(("".join(literal), found.group(1), found.group(3) or "", found.group(2)))
        literal = []
        i = found.end()
    if literal or not out:
        out.append(("".join(literal), None, "", None))
    return out


def command_placeholders(
    command: list[str], field: str = "objective.command"
) -> list[tuple[int, str]]:
    """``(argument index, name)`` of every ``{name}`` placeholder in ``command``.

    ``field`` names the list in messages (``objective.command``, ``script.args``...).
    """
    return [
        (i, name)
        for i, arg in enumerate(command)
        for _, name, _, _ in _split_placeholders(arg, f"{field}[{i}]")
        if name is not None
    ]


def placeholder_value(value: Any) -> str:
    """One parameter as an argument word, spelled so that it reads back as the same value:
    an int as an int, a float with ``repr`` (``0.001``, ``1e-05``), a bool as TOML/JSON
    ``true``/``false``, a string as given."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # a numpy scalar: its repr would be np.float64(...)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def fill_placeholders(args: list[str], values: dict[str, Any], *, field: str) -> list[str]:
    """``args`` with every ``{name}`` replaced by ``values[name]`` (``{{``/``}}``: a brace).

    Each filled argument stays ONE argv word, whatever the value holds (templates quote it).
    ``{name:spec}`` applies a format spec to the raw value (``{lr:.3g}``). A name not in
    ``values`` is an ``InputError`` naming ``field[i]`` and the name.
    """
    out = []
    for i, arg in enumerate(args):
        pieces = []
        for literal, name, spec, conv in _split_placeholders(arg, f"{field}[{i}]"):
            pieces.append(literal)
            if name is None:
                continue
            if name not in values:
                known = ", ".join(sorted(values)) or "none"
                raise InputError(
                    f"{field}[{i}]: placeholder {{{name}}} has no value (known: {known}; "
                    "use {{ and }} for literal braces)"
                )
            value = values[name]
            if isinstance(value, str) and (not spec or value == ""):
                pieces.append(value)  # a string as given; "" is an inactive parameter
                continue
            try:
                raw = value.item() if hasattr(value, "item") else value
                if spec and not conv and not isinstance(raw, bool):
                    pieces.append(format(raw, spec))
                else:
                    pieces.append(placeholder_value(raw))
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"{field}[{i}]: cannot format {name}={value!r} as {{{name}:{spec}}}: {exc}"
                ) from None
        out.append("".join(pieces))
    return out


@dataclass(frozen=True)
class TrainPlan:
    """A checked spec turned into a job: the request and the job's ``train.json``."""

    spec: TrainSpec
    request: JobRequest
    config: RunConfig

    def files(self) -> dict[str, str]:
        """Files for the run directory (``submit(files=...)``)."""
        return {CONFIG_FILE: json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"}


def plan_training(
    spec: TrainSpec, site: Site, placeholders: dict[str, Any] | None = None
) -> TrainPlan:
    """Check ``spec`` against ``site`` and everything reachable from the login node.

    Raises ``InputError`` before anything is written or queued: unknown task reference or
    script, unknown backend, Horovod not installed, more GPUs or nodes than the partition has,
    a ``{placeholder}`` in ``[script]`` without a value. ``placeholders``: what a search
    trial's placeholders read (see :meth:`TrainSpec.fill_script`); None for ``aimass train``.
    """
    spec = spec.fill_script(placeholders)
    spec.check_workload()
    backend = spec.resolved_backend(site.training.backend)
    if backend == "horovod":
        problem = horovod_problem(site.python)
        if problem:
            raise InputError(f"backend: horovod requested but {problem}")
    repository = spec.model.repository
    if repository:
        repo = Path(repository).expanduser()
        repository = str(repo if repo.is_absolute() else (spec.base_dir / repo).resolve())
    else:
        repository = str(site.models_root)
    job = spec.job
    python = site.python
    request = request_from_mapping(
        {
            "kind": "train",
            "name": spec.run_name,
            "command": spec.command(python),
            "env": dict(job.env),
            "nodes": job.nodes,
            "ntasks_per_node": job.ntasks_per_node,
            "gpus_per_node": job.gpus_per_node,
            "cpus_per_task": job.cpus_per_task,
            "mem": job.mem,
            "time": job.time,
            "partition": job.partition or site.training.partition,
            "account": job.account,
            "qos": job.qos,
            "reservation": job.reservation,
            "constraint": job.constraint,
            "sbatch_extra": list(job.sbatch_extra),
            "requeue": site.preemption.max_restarts > 0,
            "signal": True,
            "workdir": str(spec.base_dir),
            # torch.distributed and FSDP meet over TCP: no PMI to set up (tens of ms per
            # step start). Horovod and the user's own programs may use MPI.
            "mpi": backend == "horovod" or spec.script is not None,
            "template_vars": {"backend": backend},
        },
        where="job",
    ).resolve(site)
    config = spec.to_run_config(
        run_dir=None,  # the job takes it from $AIMASS_RUN_DIR
        repository=repository,
        backend=backend,
        warning_signal=site.preemption.signal,
        max_restarts=site.preemption.max_restarts,
    )
    if config.keep_checkpoints is None:
        config.keep_checkpoints = site.training.keep_checkpoints
    return TrainPlan(spec, request, config)


def load_train_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainSpec:
    """Read and validate a spec; ``overrides`` are dotted keys (``job.nodes``) from CLI flags."""
    path = Path(path)
    data = read_spec_toml(path)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec_from_mapping(data, source=str(path), where=str(path))


def spec_from_mapping(data: dict[str, Any], *, source: str | None, where: str) -> TrainSpec:
    """Validate a mapping; an ``InputError`` names the first bad key."""
    check_tree(data, label=where)
    try:
        spec = TrainSpec.model_validate(data)
    except ValidationError as exc:
        problems = problems_from_validation(exc, TrainSpec)
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        first = problems[0]
        # Whole-spec checks carry their own field name in the message.
        text = str(first) if first.path else first.message
        raise InputError(f"{where}: {text}{more}") from None
    spec.source = source
    return spec


# --------------------------------------------------------------------------- task refs


def locate_module(name: str, search_paths: list[str]) -> importlib.machinery.ModuleSpec | None:
    """Find module ``name`` without executing it or any parent package."""
    parts = name.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0], [*search_paths, *sys.path])
    if spec is None:
        try:
            spec = importlib.util.find_spec(parts[0])  # meta-path finders (editable installs)
        except (ImportError, ValueError):
            spec = None
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: i + 1]), list(spec.submodule_search_locations)
        )
    return spec


def _top_level_defs(tree: ast.Module) -> dict[str, ast.AST]:
    """Names bound at module level (also inside top-level if/try blocks)."""
    names: dict[str, ast.AST] = {}

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names[node.name] = node
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        names[target.id] = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names[node.target.id] = node
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    names[(alias.asname or alias.name).split(".")[0]] = node
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def check_task_ref(ref: str, search_paths: list[str], args: dict[str, Any] | None = None) -> Path:
    """Check that ``module:function`` exists (and accepts ``args``); returns the module file."""
    module_name, _, attr = ref.partition(":")
    spec = locate_module(module_name, search_paths)
    if spec is None or spec.origin is None:
        shown = ", ".join(search_paths[:3])
        raise InputError(
            f"task.ref: module {module_name!r} of {ref!r} not found (looked in {shown} "
            "and the Python path)"
        )
    origin = Path(spec.origin)
    if origin.suffix != ".py":
        return origin  # compiled module: cannot look inside without importing it
    try:
        tree = ast.parse(origin.read_text(encoding="utf-8"), filename=str(origin))
    except SyntaxError as exc:
        raise InputError(f"task.ref: {origin} has a syntax error at line {exc.lineno}") from None
    defs = _top_level_defs(tree)
    head = attr.split(".")[0]
    node = defs.get(head)
    if node is None:
        raise InputError(f"task.ref: {module_name!r} ({origin}) defines no {head!r}")
    if args and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "." not in attr:
        a = node.args
        if a.kwarg is None:
            accepted = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
            unknown = sorted(set(args) - accepted)
            if unknown:
                raise InputError(
                    f"task.args.{unknown[0]}: {ref} takes no argument {unknown[0]!r} "
                    f"(it takes {', '.join(sorted(accepted)) or 'none'})"
                )
    return origin


# Run by the job's interpreter: finds Horovod and its PyTorch extension without importing them.
_HOROVOD_PROBE = """
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("horovod")
if spec is None or not spec.submodule_search_locations:
    print("missing")
elif any(any((pathlib.Path(p) / "torch").glob("mpi_lib_v2*.so"))
         for p in spec.submodule_search_locations):
    print("ok")
else:
    print("no-torch")
"""


def horovod_problem(python: str | None = None) -> str | None:
    """Why Horovod cannot run in the jobs' interpreter ``python``, or None when it can.

    Asks that interpreter (the site's ``python``, which compute nodes run) to look for the
    package and its compiled PyTorch extension, importing neither.
    """
    python = python or sys.executable
    try:
        proc = subprocess.run(
            [python, "-c", _HOROVOD_PROBE], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the jobs' Python {python} cannot be run ({exc})"
    answer = proc.stdout.strip()
    if answer == "ok":
        return None
    if answer == "no-torch":
        return f"Horovod in {python} was built without PyTorch (HOROVOD_WITH_PYTORCH=1)"
    return f"Horovod is not installed for {python} (run scripts/build-horovod)"
