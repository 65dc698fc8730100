"""Site configuration: the one file a site admin edits to describe a cluster.

A site is a TOML file (``site_configs/dev.toml`` is a small complete example, ``example-hpc.toml``
a production-shaped one). It is parsed into pydantic models with ``extra="forbid"`` so that a
misspelt key is an error, not a silently ignored setting. :func:`validate_site_file` reports
*every* problem with its key path and a hint; :func:`load_site` raises one ``InputError``.

Lookup order for :func:`load_site` (first hit wins): an explicit ref (a name or a path to a
``.toml``), ``$AIMASS_SITE``, ``~/.config/aimass/sites/``, ``/etc/aimass/sites/``, then the
bundled ``site_configs/``. In a directory, site ``NAME`` is ``NAME.toml`` or ``NAME/site.toml``
(the directory form may hold template overrides next to the config).
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import aimass_hpc
from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.common.fsutil import read_user_text
from aimass_hpc.common.names import (
    MEM_SIZE,
    SBATCH_VALUE,
    SIGNAL,
    SLURM_NAME,
    EnvName,
    OneLine,
    Rule,
    SiteName,
    SlurmName,
    Text,
    key_path,
    shown,
)
from aimass_hpc.common.timelimit import check_time, parse_time
from aimass_hpc.common.units import parse_slurm_mem_mb

# The folder holding the package: the checkout root in a source tree (plain or editable install),
# site-packages in an installed wheel.
PACKAGE_ROOT = Path(aimass_hpc.__file__).resolve().parents[1]


def _bundled_dir(name: str) -> Path:
    """The shipped data folder ``NAME`` (``job_templates``, ``site_configs``).

    A wheel carries it as package data (``aimass_hpc/NAME``, see pyproject.toml); a source
    checkout keeps it at the top level, where admins edit it, so that is the fallback.
    """
    installed = resources.files(aimass_hpc) / name
    if isinstance(installed, Path) and installed.is_dir():
        return installed.resolve()
    return PACKAGE_ROOT / name


BUNDLED_SITES = _bundled_dir("site_configs")
BUNDLED_TEMPLATES = _bundled_dir("job_templates")

SITE_ENV = "AIMASS_SITE"


def search_dirs() -> list[Path]:
    """Directories searched for site names, in lookup order (after ``$AIMASS_SITE``)."""
    return [
        Path("~/.config/aimass/sites").expanduser(),
        Path("/etc/aimass/sites"),
        BUNDLED_SITES,
    ]


# --------------------------------------------------------------------------- value checks


def parse_mem_mb(value: str | int) -> int:
    """Memory as Slurm writes it (``16000``, ``16G``, ``2T``) in MiB; raises ValueError.

    Units are :func:`aimass_hpc.common.units.parse_slurm_mem_mb`'s (K/M/G/T = powers of 1024).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory must not be negative: {value}")
        return value
    text = str(value)
    if not MEM_SIZE.matches(text):
        raise ValueError(f"not a memory size: {text!r} (use e.g. 16000, 64G, 1T)")
    try:
        return parse_slurm_mem_mb(text, "memory")
    except InputError:  # pydantic validators need ValueError, never InputError
        raise ValueError(f"not a memory size: {text!r} (use e.g. 16000, 64G, 1T)") from None


def _check_mem(value: Any) -> Any:
    if value is None:
        return value
    if not isinstance(value, str | int) or isinstance(value, bool):
        return value  # let the type check report it
    parse_mem_mb(value)
    return str(value)


_VAR_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand_path(value: str) -> str:
    """Expand ``~`` and ``$VAR``/``${VAR}``; ValueError if one is unset (USER/HOME always set)."""

    def sub(match: re.Match[str]) -> str:
        var = match.group("braced") or match.group("plain")
        if var in os.environ:
            return os.environ[var]
        if var == "USER":
            import getpass  # rarely needed ($USER is nearly always set)

            return getpass.getuser()
        if var == "HOME":
            return str(Path.home())
        raise ValueError(f"environment variable ${var} is not set")

    return os.path.expanduser(_VAR_RE.sub(sub, value))


# srun --mpi=TYPE: the plugin names `srun --mpi=list` prints (pmix, pmix_v4, pmi2, cray_shasta,
# none): lowercase words, so the value is also safe on a shell line and an #SBATCH line.
SRUN_MPI = Rule(
    "srun --mpi type", r"[a-z][a-z0-9_]*", "e.g. pmix, pmix_v4, pmi2, cray_shasta, none"
)
SRUN_OPTION = Rule("srun option name", r"--[a-z][a-z0-9\-]*", "--lowercase-words")
# srun options aimass sets itself (the launch line, the allocation): not from srun_options.
SRUN_CONTROLLED = {
    "--mpi": "mpi.srun_mpi",
    "--wait": "mpi.srun_wait",
    "--kill-on-bad-exit": "(always 1)",
    "--nodes": "the job's nodes",
    "--ntasks": "the job's tasks",
    "--ntasks-per-node": "the job's tasks",
    "--container-image": "container.image",
    "--container-mounts": "container.binds",
    "--output": "(the run directory's logs/)",
    "--error": "(the run directory's logs/)",
    "--input": "(ranks read no stdin)",
}


def check_srun_option(item: Any) -> str:
    """Validate one ``--opt`` / ``--opt=value`` for srun; ValueError says what is wrong."""
    if not isinstance(item, str) or not item.startswith("--"):
        raise ValueError(f"{shown(item)}: give long options as --name=value")
    option, _, value = item.partition("=")
    if option in SRUN_CONTROLLED:
        raise ValueError(f"{option} is set by aimass (use {SRUN_CONTROLLED[option]})")
    if not SRUN_OPTION.matches(option):
        raise ValueError(SRUN_OPTION.problem(option) or option)
    if not SBATCH_VALUE.matches(value):
        raise ValueError(f"{shown(item)}: the value may only use {SBATCH_VALUE.allowed}")
    return item


# --------------------------------------------------------------------------- the models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)


class Modules(_Model):
    """Environment modules loaded at the top of every job."""

    system: Literal["lmod", "environment-modules", "none"] = "none"
    init: Text | None = Field(None, description="shell init script that defines `module`")
    purge: bool = False
    load: list[Text] = Field(default_factory=list)

    @property
    def init_script(self) -> str:
        """The init script for ``system`` (the usual Debian/RHEL path unless set)."""
        if self.init:
            return self.init
        if self.system == "lmod":
            return "/usr/share/lmod/lmod/init/bash"
        return "/usr/share/modules/init/bash"


class Container(_Model):
    """Optional container every rank runs in."""

    runtime: Literal["apptainer", "pyxis", "none"] = "none"
    image: Text | None = None
    binds: list[Text] = Field(default_factory=list, description="src[:dst[:opts]] mounts")
    options: list[Text] = Field(
        default_factory=list,
        description="extra runtime arguments, each one word: after `apptainer exec`, or srun "
        "options for pyxis (--container-*)",
    )
    gpu_flag: bool = Field(True, description="apptainer --nv when the job has GPUs")


class Partition(_Model):
    """One Slurm partition that aimass may use."""

    name: str = Field("", description="filled from the table key: [partitions.NAME]")
    description: Text = ""
    default: bool = Field(False, description="used when a request names no partition")
    nodes: int | None = Field(None, ge=1, description="node count (informational, for checks)")
    gpus_per_node: int = Field(0, ge=0)
    gpu_type: SlurmName | None = Field(None, description="gres type, e.g. h100; None = untyped")
    gres_name: SlurmName = "gpu"
    gpu_request: Literal["gres", "gpus-per-node"] = Field(
        "gres", description="how GPUs are asked for: --gres=gpu:TYPE:N or --gpus-per-node=TYPE:N"
    )
    cpus_per_node: int = Field(1, ge=1)
    mem_per_node: str | None = Field(None, description="e.g. 512G; None = do not check --mem")
    max_time: Text = Field("UNLIMITED", description="the partition's MaxTime, Slurm format")
    default_time: Text | None = Field(None, description="--time when a request gives none")
    account: SlurmName | None = Field(None, description="overrides the site account here")
    qos: SlurmName | None = Field(None, description="overrides the site QOS here")
    constraints: list[SlurmName] = Field(
        default_factory=list,
        description="features every job on this partition asks for: the default --constraint "
        "(joined with &) when the job gives none; replaces the site's constraints here",
    )
    default_cpus_per_task: int | None = Field(
        None, ge=1, description="--cpus-per-task when the job gives none"
    )
    default_mem: str | None = Field(None, description="--mem per node when the job gives none")
    modules: Modules | None = Field(
        None, description="merged over the site's [modules] for jobs here (see docs)"
    )
    container: Container | None = Field(
        None, description="merged over the site's [container] for jobs here (see docs)"
    )
    env: dict[EnvName, Text] = Field(
        default_factory=dict, description="exported after the site's env (wins over it)"
    )

    @field_validator("max_time", "default_time")
    @classmethod
    def _times(cls, value: str | None) -> str | None:
        return check_time(value)

    @field_validator("mem_per_node", "default_mem", mode="before")
    @classmethod
    def _mem(cls, value: Any) -> Any:
        return _check_mem(value)

    @property
    def max_seconds(self) -> int | None:
        """MaxTime in seconds; None when unlimited."""
        return parse_time(self.max_time)

    @property
    def mem_mb(self) -> int | None:
        """Memory per node in MiB, if the site declared it."""
        return None if self.mem_per_node is None else parse_mem_mb(self.mem_per_node)

    def gpu_gres(self, count: int) -> str:
        """The value for ``--gres`` / ``--gpus-per-node`` asking for ``count`` GPUs per node."""
        if self.gpu_request == "gpus-per-node":
            return f"{self.gpu_type}:{count}" if self.gpu_type else str(count)
        parts = [self.gres_name] + ([self.gpu_type] if self.gpu_type else []) + [str(count)]
        return ":".join(parts)


class Mpi(_Model):
    """How ranks are launched."""

    launcher: Literal["srun", "mpirun", "none"] = "srun"
    srun_mpi: str = Field(
        "pmix", description="srun --mpi=TYPE: what `srun --mpi=list` shows (pmix_v4, pmi2, ...)"
    )
    srun_wait: int = Field(60, ge=0, description="srun --wait: seconds after the first rank ends")
    mpirun_args: list[Text] = Field(default_factory=list)

    @field_validator("srun_mpi")
    @classmethod
    def _srun_mpi(cls, value: str) -> str:
        if not SRUN_MPI.matches(value):
            raise ValueError(SRUN_MPI.problem(value))
        return value


class Lustre(_Model):
    """Stripe hints applied to the directories aimass creates on a Lustre filesystem."""

    stripe_count: int = Field(1, ge=-1, description="-1 = all OSTs")
    stripe_size: str = "1M"

    @field_validator("stripe_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return _check_mem(value)


class Filesystems(_Model):
    """Where aimass keeps things (``~`` and ``$VAR`` are expanded at load time)."""

    runs: Text = Field(description="root of run directories (shared with the compute nodes)")
    models: Text = Field(description="root of the model repository")
    scratch: Text | None = Field(None, description="node-local or scratch space for jobs")
    lustre: Lustre | None = None


class Preemption(_Model):
    """How jobs are warned before preemption or the time limit."""

    signal: str = "USR1"
    grace_seconds: int = Field(120, ge=0, le=65535)
    max_restarts: int = Field(3, ge=0)

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if not SIGNAL.matches(name):
            raise ValueError(SIGNAL.problem(value))
        return name


class Training(_Model):
    """Defaults for ``aimass train``."""

    backend: Literal["torch", "horovod", "fsdp"] = "torch"
    partition: SlurmName | None = None
    keep_checkpoints: int = Field(
        5,
        ge=1,
        description="checkpoints of a run kept (newest first; final models and aliased "
        "versions always stay); a spec's [train] keep_checkpoints overrides it",
    )


class Vllm(_Model):
    """How this site provides vLLM (``aimass serve --engine vllm``): exactly one of
    ``python`` (a venv's interpreter; relative paths are relative to the site file),
    ``module`` (an environment module to load) or ``container`` (an image)."""

    python: OneLine | None = Field(None, description="python of an environment that has vllm")
    module: OneLine | None = Field(None, description="environment module providing vllm")
    container: OneLine | None = Field(None, description="container image providing vllm")
    args: list[Text] = Field(
        default_factory=list,
        description="more api_server arguments, e.g. CPU settings (--enforce-eager ...)",
    )
    env: dict[EnvName, Text] = Field(default_factory=dict, description="exported to vLLM")

    @model_validator(mode="after")
    def _one_way(self) -> Vllm:
        given = [k for k in ("python", "module", "container") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of python, module, container"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class Serving(_Model):
    """Defaults for ``aimass serve``."""

    partition: SlurmName | None = None
    default_reservation: SlurmName | None = None
    bind: Literal["node", "any"] = Field("node", description="node: listen on the node's address")
    port_range: tuple[int, int] = (20000, 29999)
    vllm: Vllm | None = Field(None, description="[serving.vllm]: how jobs run vLLM")

    @field_validator("port_range")
    @classmethod
    def _ports(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not (1024 <= low <= high <= 65535):
            raise ValueError(f"need 1024 <= low <= high <= 65535, got [{low}, {high}]")
        return value


class Search(_Model):
    """Defaults for ``aimass search`` trials."""

    partition: SlurmName | None = None


class Dashboard(_Model):
    """``aimass dashboard`` on this site."""

    admins: list[SlurmName] = Field(
        default_factory=list, description="users who see every user's jobs (besides --admin)"
    )


class Site(_Model):
    """A whole site config. ``source`` is the file it came from (not a TOML key)."""

    name: SiteName
    description: Text = ""
    scheduler: Literal["slurm", "local"] = "slurm"
    account: SlurmName | None = None
    qos: SlurmName | None = None
    constraints: list[SlurmName] = Field(default_factory=list, description="default --constraint")
    python: Text = Field(
        "python3",
        description="interpreter jobs use to run aimass_hpc; empty = the one running aimass "
        "(for sites where login and compute nodes share this installation)",
    )
    templates: Text | None = Field(None, description="dir of template overrides (same names)")
    sbatch_options: list[str] = Field(
        default_factory=list,
        description="#SBATCH --opt[=value] lines in every job (a job's sbatch_extra wins)",
    )
    srun_options: list[str] = Field(
        default_factory=list, description="--opt[=value] words added to every srun launch"
    )
    partitions: dict[str, Partition] = Field(min_length=1)
    modules: Modules = Field(default_factory=Modules)
    container: Container = Field(default_factory=Container)
    mpi: Mpi = Field(default_factory=Mpi)
    filesystems: Filesystems
    env: dict[EnvName, Text] = Field(default_factory=dict, description="exported in every job")
    preemption: Preemption = Field(default_factory=Preemption)
    training: Training = Field(default_factory=Training)
    serving: Serving = Field(default_factory=Serving)
    search: Search = Field(default_factory=Search)
    dashboard: Dashboard = Field(default_factory=Dashboard)
    source: str | None = Field(None, exclude=True, description="set by the loader")

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        return value or sys.executable

    @field_validator("sbatch_options")
    @classmethod
    def _sbatch_options(cls, value: list[str]) -> list[str]:
        from aimass_hpc.config.job_spec import check_sbatch_extra  # it imports this module

        for item in value:
            check_sbatch_extra(item)
        return value

    @field_validator("srun_options")
    @classmethod
    def _srun_options(cls, value: list[str]) -> list[str]:
        for item in value:
            check_srun_option(item)
        return value

    # -- per-partition settings (merge rules: docs/site-admin.md)

    def modules_for(self, part: Partition) -> Modules:
        """The site's ``[modules]`` with the partition's table merged over it: keys the
        partition sets replace the site's, except ``load``, which is appended."""
        return _merged(self.modules, part.modules, append=("load",))

    def container_for(self, part: Partition) -> Container:
        """The site's ``[container]`` with the partition's merged over it: keys the partition
        sets replace the site's, ``binds``/``options`` are appended; a partition naming another
        ``runtime`` replaces the whole table (nothing of the site's container is kept)."""
        own = part.container
        switched = own is not None and "runtime" in own.model_fields_set
        if own is not None and switched and own.runtime != self.container.runtime:
            return own  # another runtime: nothing of the site's applies
        return _merged(self.container, part.container, append=("binds", "options"))

    def env_for(self, part: Partition) -> dict[str, str]:
        """The site's ``[env]`` then the partition's (the partition wins)."""
        return {**self.env, **part.env}

    # -- helpers used by everyone else

    def partition(self, name: str | None = None) -> Partition:
        """The partition called ``name``, or the default one when ``name`` is None."""
        if name is None:
            return self.default_partition
        try:
            return self.partitions[name]
        except KeyError:
            raise InputError(
                f"partition: unknown partition {name!r} on site {self.name!r}"
                f"{_did_you_mean(name, self.partitions)} (known: {', '.join(self.partitions)})"
            ) from None

    @property
    def default_partition(self) -> Partition:
        """The partition marked ``default = true`` (or the only one)."""
        for part in self.partitions.values():
            if part.default:
                return part
        return next(iter(self.partitions.values()))

    @property
    def runs_root(self) -> Path:
        """Root directory of run directories."""
        return Path(self.filesystems.runs)

    @property
    def models_root(self) -> Path:
        """Root directory of the model repository."""
        return Path(self.filesystems.models)

    @property
    def source_dir(self) -> Path | None:
        """Directory of the site file (relative paths in the config are relative to it)."""
        return Path(self.source).parent if self.source else None

    @property
    def template_dir(self) -> Path | None:
        """Directory whose templates override the bundled ones, if any."""
        if self.templates:
            path = Path(self.templates)
            if not path.is_absolute() and self.source_dir is not None:
                path = self.source_dir / path
            return path
        if self.source and Path(self.source).name == "site.toml":
            return self.source_dir  # directory form: NAME/site.toml + NAME/*.j2
        return None

    def template_overrides(self) -> list[str]:
        """Names of the templates (``*.j2``) the site's override directory holds."""
        folder = self.template_dir
        if folder is None or not folder.is_dir():
            return []
        return sorted(path.name for path in folder.glob("*.j2"))

    def ref(self) -> str:
        """What to pass to :func:`load_site` (or ``$AIMASS_SITE``) to load this site again."""
        return self.source or self.name


_M = Any


def _merged(base: _M, over: _M, append: tuple[str, ...]) -> _M:
    """``base`` with the fields ``over`` set replacing it (``append`` lists extend it)."""
    if over is None:
        return base
    updates: dict[str, Any] = {}
    for key in over.model_fields_set:
        value = getattr(over, key)
        if key in append:
            value = list(getattr(base, key)) + [v for v in value if v not in getattr(base, key)]
        updates[key] = value
    return base.model_copy(update=updates)


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where, what, and how to fix it."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path or '<top>'}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


def _did_you_mean(word: str, options: Any) -> str:
    import difflib  # only on an error path: keep it out of every command's start-up

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_loc(loc: tuple[Any, ...]) -> str:
    """``a.b[0]`` for a pydantic error location; odd keys are shown quoted, on one line."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for a bad dict key: the key is the previous part
            continue
        out = key_path(out, part)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at ``loc`` (to suggest its field names)."""
    current: Any = model
    skip_key = False  # after a dict[str, Model] field the next loc part is a key, not a field
    for part in loc:
        if isinstance(part, int) or skip_key:
            skip_key = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        skip_key = getattr(field.annotation, "__origin__", None) is dict
        current = _inner_model(field.annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``X | None``, ``dict[str, X]`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


# Names admins write for what aimass calls otherwise.
_ALIASES = {
    "singularity": "apptainer",
    "enroot": "pyxis",
    "docker": "pyxis",
    "podman": "pyxis",
    "tcl": "environment-modules",
    "tmod": "environment-modules",
    "modules": "environment-modules",
    "environment_modules": "environment-modules",
    "envmodules": "environment-modules",
    "openmpi": "mpirun",
    "mpiexec": "mpirun",
    "pytorch": "torch",
}


def _literal_hint(value: Any, expected: str) -> str:
    """``got 'X'; did you mean 'Y'?`` for a value outside a fixed set of choices."""
    choices = re.findall(r"'([^']*)'", expected)
    hint = f"got {shown(value)}"
    if not isinstance(value, str) or not choices:
        return hint
    lowered = value.strip().lower()
    for guess in (lowered, _ALIASES.get(lowered)):
        if guess in choices:
            return f"{hint}; did you mean {guess!r}?"
    return hint + _did_you_mean(lowered, choices)


_BOUND_ERRORS = {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}


def problems_from_validation(
    exc: ValidationError, model: type[BaseModel], prefix: str = ""
) -> list[Problem]:
    """Turn pydantic's errors into :class:`Problem` s with key paths and hints."""
    problems: list[Problem] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # dict-keyed models report loc like ('partitions', 'gpu', 'gpus_per_node'): fine as is.
        path = _format_loc(loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        kind = err["type"]
        message = err["msg"].removeprefix("Value error, ")
        hint = ""
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            fields = list(owner.model_fields) if owner else []
            fields = [
                f for f in fields if f not in {"source", "name"} or owner not in (Site, Partition)
            ]
            message = "unknown key"
            guess = _did_you_mean(str(loc[-1]), fields).removeprefix("; ")
            hint = guess or (f"known keys: {', '.join(fields)}" if fields else "")
        elif kind == "missing":
            message = "required key is missing"
            hint = "add it to the config"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            hint = f"got {type(err.get('input')).__name__} {shown(err.get('input'))}"
        elif kind == "literal_error":
            hint = _literal_hint(err.get("input"), str(err.get("ctx", {}).get("expected", "")))
        elif kind in _BOUND_ERRORS:
            hint = f"got {shown(err.get('input'))}"
        problems.append(Problem(path, message, hint))
    # A misspelt key also makes the real one "missing": report the unknown key first.
    problems.sort(key=lambda p: p.message != "unknown key")
    return problems


def _semantic_problems(site: Site) -> list[Problem]:
    """Checks that need the whole config (cross references, consistency)."""
    problems: list[Problem] = []
    defaults = [name for name, part in site.partitions.items() if part.default]
    if len(defaults) > 1:
        problems.append(
            Problem(
                "partitions",
                f"more than one default partition: {', '.join(defaults)}",
                "set default = true on exactly one",
            )
        )
    for name, part in site.partitions.items():
        where = key_path("partitions", name)
        if not SLURM_NAME.matches(name):
            problems.append(
                Problem(
                    where,
                    f"partition name {shown(name)} has odd characters",
                    "allowed: A-Z a-z 0-9 _ . + -",
                )
            )
        if part.gpus_per_node and part.gpu_request == "gpus-per-node" and part.gres_name != "gpu":
            problems.append(
                Problem(
                    f"{where}.gpu_request",
                    "--gpus-per-node only asks for gres 'gpu'",
                    "use gpu_request = 'gres' for other gres names",
                )
            )
        if part.gpu_type and not part.gpus_per_node:
            problems.append(
                Problem(
                    f"{where}.gpu_type",
                    "gpu_type set but gpus_per_node is 0",
                    "set gpus_per_node or drop gpu_type",
                )
            )
        if part.default_time is not None:
            limit, wanted = part.max_seconds, parse_time(part.default_time)
            if limit is not None and wanted is not None and wanted > limit:
                problems.append(
                    Problem(
                        f"{where}.default_time",
                        f"{part.default_time} is above max_time {part.max_time}",
                        "lower it or raise max_time",
                    )
                )
    for section in ("training", "serving", "search"):
        wanted = getattr(site, section).partition
        if wanted is not None and wanted not in site.partitions:
            problems.append(
                Problem(
                    f"{section}.partition",
                    f"unknown partition {wanted!r}",
                    _did_you_mean(wanted, site.partitions).removeprefix("; ")
                    or f"known: {', '.join(site.partitions)}",
                )
            )
    problems += _container_problems(site, "container", site.container, site.container)
    for name, part in site.partitions.items():
        where = key_path("partitions", name)
        problems += _partition_problems(site, part, where)
    if site.scheduler == "local" and site.mpi.launcher == "srun":
        problems.append(
            Problem(
                "mpi.launcher",
                "the local scheduler has no srun",
                "use 'none' (or 'mpirun') with scheduler = 'local'",
            )
        )
    if site.modules.system == "none" and site.modules.load:
        problems.append(
            Problem(
                "modules.system",
                "modules to load but system is 'none'",
                "set system = 'lmod' or 'environment-modules'",
            )
        )
    template_dir = site.template_dir
    if site.templates and template_dir is not None and not template_dir.is_dir():
        problems.append(
            Problem(
                "templates",
                f"not a directory: {template_dir}",
                "point it at a directory holding *.j2 overrides",
            )
        )
    return problems


# Apptainer options that empty the environment the ranks need (AIMASS_*, MASTER_*, SLURM_*).
_CLEANENV = {"--cleanenv", "-e", "--containall", "-C"}
_PYXIS_OPTION = re.compile(r"--(no-)?container-[a-z0-9-]+(=.*)?", re.DOTALL)


def _container_problems(site: Site, where: str, own: Container, ctr: Container) -> list[Problem]:
    """Problems of the effective container ``ctr``; ``own`` is the table written at ``where``
    (its options are the ones to name)."""
    problems: list[Problem] = []
    if ctr.runtime != "none" and not ctr.image:
        problems.append(
            Problem(
                f"{where}.image",
                f"runtime {ctr.runtime!r} needs an image",
                "set image or runtime = 'none'",
            )
        )
    if ctr.runtime == "pyxis" and site.mpi.launcher != "srun":
        problems.append(
            Problem(
                f"{where}.runtime", "pyxis only works through srun", "set mpi.launcher = 'srun'"
            )
        )
    for i, opt in enumerate(own.options):
        at = f"{where}.options[{i}]"
        word = opt.split("=", 1)[0]
        if ctr.runtime == "apptainer" and word in _CLEANENV:
            problems.append(
                Problem(
                    at,
                    f"{opt} would clear the environment the ranks need (AIMASS_*, SLURM_*, "
                    "MASTER_ADDR)",
                    "drop it; set what the container needs in [env]",
                )
            )
        elif ctr.runtime == "pyxis" and not _PYXIS_OPTION.fullmatch(opt):
            problems.append(
                Problem(at, f"{shown(opt)} is not a pyxis srun option", "use --container-*")
            )
    return problems


def _partition_problems(site: Site, part: Partition, where: str) -> list[Problem]:
    """Per-partition defaults and overrides that contradict the partition or the site."""
    problems: list[Problem] = []
    if part.default_cpus_per_task is not None and part.default_cpus_per_task > part.cpus_per_node:
        problems.append(
            Problem(
                f"{where}.default_cpus_per_task",
                f"{part.default_cpus_per_task} is above cpus_per_node {part.cpus_per_node}",
                "lower it or raise cpus_per_node",
            )
        )
    limit = part.mem_mb
    if (
        part.default_mem is not None
        and limit is not None
        and parse_mem_mb(part.default_mem) > limit
    ):
        problems.append(
            Problem(
                f"{where}.default_mem",
                f"{part.default_mem} is above mem_per_node {part.mem_per_node}",
                "lower it or raise mem_per_node",
            )
        )
    if part.modules is not None:
        mods = site.modules_for(part)
        if mods.system == "none" and mods.load:
            problems.append(
                Problem(
                    f"{where}.modules.system",
                    "modules to load but system is 'none'",
                    "set system = 'lmod' or 'environment-modules'",
                )
            )
    if part.container is not None:
        problems += _container_problems(
            site, f"{where}.container", part.container, site.container_for(part)
        )
    return problems


def _expand_paths(data: dict[str, Any]) -> list[Problem]:
    """Expand ``~``/``$VAR`` in filesystem paths in place; unset variables are problems."""
    problems: list[Problem] = []
    targets: list[tuple[Any, Any, str]] = []
    fs = data.get("filesystems")
    if isinstance(fs, dict):
        targets += [(fs, key, f"filesystems.{key}") for key in ("runs", "models", "scratch")]
    ctr = data.get("container")
    if isinstance(ctr, dict):
        targets.append((ctr, "image", "container.image"))
    targets.append((data, "templates", "templates"))
    containers = [(ctr, "container")]
    parts = data.get("partitions")
    if isinstance(parts, dict):
        for name, part in parts.items():
            if isinstance(part, dict) and isinstance(part.get("container"), dict):
                part["container"] = dict(part["container"])
                where = key_path(key_path("partitions", name), "container")
                containers.append((part["container"], where))
                targets.append((part["container"], "image", f"{where}.image"))
    for holder, where in containers:
        if isinstance(holder, dict) and isinstance(holder.get("binds"), list):
            holder["binds"] = list(holder["binds"])
            targets += [
                (holder["binds"], i, f"{where}.binds[{i}]") for i in range(len(holder["binds"]))
            ]
    for holder, key, path in targets:
        value = holder[key] if isinstance(holder, list) else holder.get(key)
        if isinstance(value, str):
            try:
                holder[key] = expand_path(value)
            except ValueError as exc:
                problems.append(Problem(path, str(exc), "set it or write the path out"))
    return problems


def parse_site(
    data: dict[str, Any], source: str | None = None
) -> tuple[Site | None, list[Problem]]:
    """Validate a parsed TOML mapping; returns the site (None if invalid) and all problems."""
    data = dict(data)
    data.pop("source", None)
    if isinstance(data.get("container"), dict):
        data["container"] = dict(data["container"])  # expanded below: never the caller's
    parts = data.get("partitions")
    named: list[Problem] = []
    if isinstance(parts, dict):
        named = [
            Problem(
                key_path(key_path("partitions", name), "name"),
                "a partition's name is its table key",
                f"remove it (this is [partitions.{name}])",
            )
            for name, part in parts.items()
            if isinstance(part, dict) and "name" in part
        ]
        data["partitions"] = {
            name: ({**part, "name": name} if isinstance(part, dict) else part)
            for name, part in parts.items()
        }
    problems = named + _expand_paths(data)
    try:
        site = Site.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems += problems_from_validation(exc, Site)
        # Cross-field checks in the same pass: on a copy without the bad values.
        lenient = _lenient_site({**data, "source": source}, exc)
        if lenient is not None:
            # A dropped value may make its neighbours look inconsistent: skip what the
            # tables with field errors say (their field errors come first anyway).
            tables = {_table_of(p.path) for p in problems} - {""}
            exact = {p.path for p in problems}
            problems += [
                p
                for p in _semantic_problems(lenient)
                if p.path not in exact and not any(_within(p.path, t) for t in tables)
            ]
        return None, problems
    problems += _semantic_problems(site)
    return (None if problems else site), problems


def _table_of(path: str) -> str:
    """``partitions.gpu`` for ``partitions.gpu.gpu_type`` (``""`` for a top-level key)."""
    path = re.sub(r"\[[0-9]+\]$", "", path)
    return path.rsplit(".", 1)[0] if "." in path else ""


def _within(path: str, table: str) -> bool:
    return path == table or path.startswith(f"{table}.") or path.startswith(f"{table}[")


def _lenient_site(data: dict[str, Any], exc: ValidationError) -> Site | None:
    """The site with every invalid value dropped (and a placeholder for a missing required
    one), so that cross-field checks can run on the rest; None when that does not validate."""
    import copy

    data = copy.deepcopy(data)
    for _ in range(4):
        for err in exc.errors():
            loc = [part for part in err["loc"] if part != "[key]"]
            # A bad list item or dict key: drop the whole value that holds it.
            while loc and isinstance(loc[-1], int):
                loc.pop()
            holder: Any = data
            for part in loc[:-1]:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if not isinstance(holder, dict) or not loc:
                return None
            if err["type"] == "missing":
                holder[loc[-1]] = "missing"
            else:
                holder.pop(loc[-1], None)
        try:
            return Site.model_validate(data)
        except ValidationError as again:
            exc = again
    return None


def validate_site_file(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem in the site file at ``path`` (empty list = valid)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [Problem("", f"no such file: {path}", "give a path to a .toml or a site name")]
    except tomllib.TOMLDecodeError as exc:
        return [Problem("", f"not valid TOML: {exc}", "fix the syntax first")]
    except UnicodeDecodeError:
        return [Problem("", "not UTF-8 text", "save the file as UTF-8")]
    return parse_site(data, str(path.resolve()))[1]


def _site_file_in(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.toml", directory / name / "site.toml"):
        if candidate.is_file():
            return candidate
    return None


def resolve_site_path(ref: str | None = None) -> Path:
    """Find the site file for ``ref`` (name or path), following the lookup order."""
    if ref is None:
        ref = os.environ.get(SITE_ENV) or None
    if ref is None:
        raise InputError(
            "no site given: pass --site NAME|PATH or set $AIMASS_SITE "
            f"(bundled sites: {', '.join(sorted(s for s, _ in list_sites()))})"
        )
    try:
        found = _find_site_file(ref)
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        found = None
        if ref.endswith(".toml") or os.sep in ref:
            raise NotFoundError(f"site file not found: {shown(ref)}") from None
    if found is not None:
        return found
    known = [name for name, _ in list_sites()]
    raise NotFoundError(
        f"unknown site {shown(ref)}{_did_you_mean(ref, known)} (known: {', '.join(known)})"
    )


def _find_site_file(ref: str) -> Path | None:
    """The site file ``ref`` names (a path, or a name in the search dirs), or None."""
    as_path = Path(os.path.expanduser(ref))
    if ref.endswith(".toml") or os.sep in ref or as_path.is_file():
        if as_path.is_file():
            return as_path.resolve()
        if as_path.is_dir() and (as_path / "site.toml").is_file():
            return (as_path / "site.toml").resolve()
        raise NotFoundError(f"site file not found: {shown(ref)}")
    for directory in search_dirs():
        found = _site_file_in(directory, ref)
        if found is not None:
            return found.resolve()
    return None


def list_sites() -> list[tuple[str, Path]]:
    """All sites visible by name: (name, file), earlier search dirs shadowing later ones."""
    seen: dict[str, Path] = {}
    for directory in search_dirs():
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            if entry.suffix == ".toml" and entry.is_file():
                seen.setdefault(entry.stem, entry)
            elif entry.is_dir() and (entry / "site.toml").is_file():
                seen.setdefault(entry.name, entry / "site.toml")
    return sorted(seen.items())


def load_site(ref: str | None = None) -> Site:
    """Load and validate a site by name or path (see the module doc for the lookup order).

    Raises ``InputError`` naming the first problem (and how many more) when the config is
    invalid, ``NotFoundError`` when no such site exists.
    """
    path = resolve_site_path(ref)
    text = read_user_text(path, "site config")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"site {path}: not valid TOML: {exc}") from None
    site, problems = parse_site(data, str(path))
    if site is None or problems:
        more = (
            f" (+{len(problems) - 1} more; run `aimass site check {path}`)"
            if len(problems) > 1
            else ""
        )
        raise InputError(f"site {path}: {problems[0]}{more}")
    return site
