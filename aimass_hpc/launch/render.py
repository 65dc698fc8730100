"""Job-script rendering: a pure function (site, resolved request, run dir) -> bash script text.

Quoting is enforced by the template environment, not left to template authors:

* ``{{ x|q }}`` shell-quotes ``x`` (a list becomes space-separated quoted words) and marks the
  result as quoted;
* ``{{ x|sb }}`` is for ``#SBATCH`` values: it passes only a strict character set (sbatch
  parses those lines itself, so quoting would not help) and refuses anything else;
* ``{{ x|ident }}`` passes environment-variable names (a full-string match, see
  :mod:`aimass_hpc.common.names`);
* ``{{ x|comment }}`` makes any value safe on a ``#`` comment line: control characters
  (newlines included) become visible escapes, so a value cannot end the comment;
* a ``finalize`` hook refuses every other string that reaches the output, so a forgotten
  filter (in a bundled template or a site override) is an error at render time, never a
  script whose meaning depends on a value. Numbers pass as they are.

The environment is a jinja sandbox (no ``__class__`` tricks) with ``StrictUndefined``.
Template lookup: the site's override directory first, then the bundled ``job_templates/``; the
bundled ones are also reachable as ``aimass:NAME`` (``{% extends "aimass:job.j2" %}``), so an
override can extend the template it replaces.
Every rendered script is checked with ``bash -n`` (:func:`check_script_syntax`) before it is
returned, so no caller can write or queue a script bash cannot parse.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import jinja2
import jinja2.runtime
from jinja2.bccache import Bucket
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import ENV_NAME, SBATCH_VALUE, shown
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.site import BUNDLED_TEMPLATES, Site

TEMPLATE_NAMES = ("job.j2", "train.j2", "trial.j2", "serve.j2")
# `{% extends "aimass:job.j2" %}` names the bundled template even where the site overrides it.
BUNDLED_PREFIX = "aimass"


class Quoted(str):
    """A string the template layer has made safe to splice into a shell script."""

    __slots__ = ()


class UnquotedValueError(InputError):
    """A template tried to print a value that did not pass ``|q``, ``|sb`` or ``|ident``."""


def shell_quote(value: Any) -> Quoted:
    """``|q``: shell-quote a scalar, or each item of a list/tuple (joined by spaces)."""
    if isinstance(value, Quoted):
        return value
    if isinstance(value, list | tuple):
        return Quoted(" ".join(shell_quote(item) for item in value))
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the variable
    if isinstance(value, dict) or value is None:
        raise UnquotedValueError(f"template: cannot shell-quote {type(value).__name__} {value!r}")
    if isinstance(value, bool):
        value = "true" if value else "false"
    return Quoted(shlex.quote(str(value)))


def sbatch_value(value: Any) -> Quoted:
    """``|sb``: a value for an ``#SBATCH`` line; only ``[A-Za-z0-9_.,:=@%+/-[]]`` pass."""
    text = str(value)
    if isinstance(value, bool) or value is None or not text or not SBATCH_VALUE.matches(text):
        raise UnquotedValueError(
            f"template: {shown(text)} cannot go on an #SBATCH line "
            f"(allowed: {SBATCH_VALUE.allowed})"
        )
    return Quoted(text)


def env_name(value: Any) -> Quoted:
    """``|ident``: an environment variable name (whole-string match, no trailing newline)."""
    if not ENV_NAME.matches(value):
        raise UnquotedValueError(f"template: {shown(value)} is not an environment variable name")
    return Quoted(value)


def _comment_char(char: str) -> str:
    """``char`` itself, or a visible escape when it could end or disturb a comment line."""
    if char == "\\":
        return "\\\\"
    category = unicodedata.category(char)
    if category.startswith("C") or category in {"Zl", "Zp"}:
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def comment_text(value: Any) -> Quoted:
    """``|comment``: any value as text that stays on one ``#`` line (newlines, CR, NUL and other
    control characters become visible escapes such as ``\\x0a``); lists are joined by spaces."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the variable
    if isinstance(value, list | tuple):
        return Quoted(" ".join(comment_text(item) for item in value))
    text = str(value)
    return Quoted("".join(_comment_char(char) for char in text))


def _finalize(value: Any) -> Any:
    """Refuse any printed value that is not quoted (or a number)."""
    if isinstance(value, Quoted):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise UnquotedValueError(
        f"template printed an unquoted value {shown(value)}: "
        "pass it through |q (shell), |sb (#SBATCH) or |ident"
    )


class _CompiledTemplates(jinja2.BytecodeCache):
    """Compiled templates kept in memory for the life of the process and on disk in the
    user's cache directory across processes, keyed by template name and file and checked
    against a hash of the source (jinja's bucket checksum).

    The loaders still read every template on each render, so an edited or newly added
    override is seen at once; only the compile step (the costly part: parse, generate, Python
    ``compile``; tens of milliseconds of every ``aimass train``) is skipped when the source is
    unchanged. A process that renders many scripts (a search driver's trials, ``aimass site
    check``'s four kinds, which all extend ``job.j2``) compiles each template once, and a new
    process loads what an earlier one compiled. Only environments made by
    :func:`template_environment` use it, so the compiled code always matches their options
    (the disk folder is named after the jinja and Python versions, whose code it holds).
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._code: dict[str, tuple[str | None, Any]] = {}
        self._dir = directory

    def load_bytecode(self, bucket: Bucket) -> None:
        found = self._code.get(bucket.key)
        if found is not None and found[0] == bucket.checksum:
            bucket.code = found[1]
            return
        folder = self._usable_dir(create=False)
        if folder is None:
            return
        try:
            with open(folder / f"{bucket.key}.cache", "rb") as fh:
                bucket.load_bytecode(fh)  # checks jinja's magic and the source checksum
        except Exception:  # noqa: BLE001 - missing, cut short, from another version: any of
            bucket.reset()  # OSError, EOFError, pickle and marshal errors; compile it anew
            return
        if bucket.code is not None:
            self._code[bucket.key] = (bucket.checksum, bucket.code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        self._code[bucket.key] = (bucket.checksum, bucket.code)
        folder = self._usable_dir(create=True)
        if folder is None:
            return
        target = folder / f"{bucket.key}.cache"
        tmp = folder / f".{bucket.key}.{os.getpid()}.tmp"
        try:  # write, then rename: a concurrent reader sees the old file or the new one
            with open(tmp, "wb") as fh:
                bucket.write_bytecode(fh)
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _usable_dir(self, *, create: bool) -> Path | None:
        """The disk cache folder when it is this user's alone (marshalled code from it is
        executed), else None: the in-memory cache still works."""
        if self._dir is None:
            return None
        try:
            if create:
                self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self._dir.stat()
        except OSError:
            return None
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return None
        return self._dir

    def clear(self) -> None:
        self._code.clear()


def _cache_dir() -> Path | None:
    """Where compiled templates are kept between processes: ``$AIMASS_CACHE_DIR`` (empty: not
    on disk), else ``$XDG_CACHE_HOME/aimass``, else ``~/.cache/aimass``."""
    base = os.environ.get("AIMASS_CACHE_DIR")
    if base is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        try:
            base = str(Path(xdg) / "aimass") if xdg else str(Path.home() / ".cache" / "aimass")
        except RuntimeError:  # no home directory to expand
            return None
    if not base:
        return None
    version = f"jinja{jinja2.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(base) / f"templates-{version}"


_COMPILED = _CompiledTemplates(_cache_dir())


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus: ``{{ super() }}`` prints the parent block as it is. That text was
    rendered by this same environment, so every value in it already passed a filter."""

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(__obj, jinja2.runtime.BlockReference) and isinstance(result, str):
            return Quoted(result)
        return result


def template_environment(site: Site) -> jinja2.Environment:
    """The sandboxed, quoting-enforcing environment for ``site`` (override dir first)."""
    return _environment(site.template_dir)


def _environment(override: Path | None) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if override is not None and override.is_dir():
        loaders.append(jinja2.FileSystemLoader(str(override)))
    bundled = jinja2.FileSystemLoader(str(BUNDLED_TEMPLATES))
    loaders.append(jinja2.PrefixLoader({BUNDLED_PREFIX: bundled}, delimiter=":"))
    loaders.append(bundled)
    env = _TemplateEnvironment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        bytecode_cache=_COMPILED,
    )
    env.filters["q"] = shell_quote
    env.filters["sb"] = sbatch_value
    env.filters["ident"] = env_name
    env.filters["comment"] = comment_text
    # |safe would bypass nothing (finalize does not trust Markup) but would mislead readers.
    env.filters.pop("safe", None)
    return env


def template_syntax_errors(directory: Path) -> list[tuple[str, int | None, str]]:
    """(file, line, message) for every ``*.j2`` in ``directory`` jinja cannot compile (bad
    syntax, an unknown filter); compiling runs nothing, so no site or request is needed."""
    env = _environment(directory)
    found: list[tuple[str, int | None, str]] = []
    for path in sorted(directory.glob("*.j2")):
        try:
            env.get_template(path.name)
        except jinja2.TemplateSyntaxError as exc:
            found.append((exc.filename or str(path), exc.lineno, exc.message or "syntax error"))
    return found


def _template_line(exc: BaseException) -> str:
    """`` (FILE line N)`` from jinja's rewritten traceback: the innermost template frame."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".j2")]
    return f" ({frames[-1].filename} line {frames[-1].lineno})" if frames else ""


def signal_spec(site: Site, request: JobRequest) -> str | None:
    """The ``--signal`` value: ``[B:]SIG@GRACE``; ``B:`` when the batch shell runs the command."""
    if not request.signal:
        return None
    prefix = "B:" if request.launcher == "none" else ""
    return f"{prefix}{site.preemption.signal}@{site.preemption.grace_seconds}"


def gpu_option(site: Site, request: JobRequest) -> tuple[str, str] | None:
    """(``--gres`` | ``--gpus-per-node``, value) for the request's GPUs, or None."""
    if not request.gpus_per_node:
        return None
    part = site.partition(request.partition)
    option = "--gpus-per-node" if part.gpu_request == "gpus-per-node" else "--gres"
    return option, part.gpu_gres(request.gpus_per_node)


def render_context(site: Site, request: JobRequest, run_dir: str | Path) -> dict[str, Any]:
    """Everything templates may use (documented in job_templates/README.md)."""
    job = request.resolve(site)
    part = site.partition(job.partition)
    env = {**site.env_for(part), **job.env}
    return {
        "site": site,
        "partition": part,
        "modules": site.modules_for(part),
        "container": site.container_for(part),
        "sbatch_options": site_sbatch_options(site, job),
        "srun_options": list(site.srun_options),
        "job": job,
        "kind": job.kind,
        "slurm_name": job.slurm_name,
        "run_dir": str(run_dir),
        "site_ref": site.ref(),
        "workdir": job.workdir or str(run_dir),
        "launcher": job.launcher,
        "srun_mpi": site.mpi.srun_mpi if job.mpi else "none",
        "env": env,
        "vars": job.template_vars,
        "python": site.python,
        "output_pattern": "logs/slurm-%A_%a.out" if job.array else "logs/slurm-%j.out",
        "signal_spec": signal_spec(site, job),
        "gpu_option": gpu_option(site, job),
        "total_tasks": job.nodes * job.ntasks_per_node,
    }


def site_sbatch_options(site: Site, request: JobRequest) -> list[str]:
    """The site's ``sbatch_options`` less those the job's ``sbatch_extra`` sets itself."""
    own = {item.partition("=")[0] for item in request.sbatch_extra}
    return [item for item in site.sbatch_options if item.partition("=")[0] not in own]


def render_request(site: Site, request: JobRequest, run_dir: str | Path | None = None) -> str:
    """Render the job script for ``request`` on ``site`` (a pure function: writes nothing).

    ``run_dir`` is where the script will live; without one a placeholder under the site's runs
    root is used (fine for previews). Raises ``InputError`` for a request the site cannot run
    or a template that prints an unquoted value.
    """
    if run_dir is None:
        run_dir = site.runs_root / f"<run>-{request.slurm_name}"
    context = render_context(site, request, run_dir)
    env = template_environment(site)
    name = f"{request.kind}.j2"
    try:
        template = env.get_template(name)
        script = template.render(context)
    except jinja2.TemplateNotFound as exc:
        raise InputError(f"template {exc.name!r} not found (site {site.name!r})") from None
    except jinja2.UndefinedError as exc:
        raise InputError(f"template {name}: {exc.message}{_template_line(exc)}") from None
    except SecurityError as exc:
        raise InputError(f"template {name}: {exc}") from None
    except UnquotedValueError as exc:  # a value without |q/|sb/|ident: say where it is printed
        raise UnquotedValueError(f"{exc}{_template_line(exc)}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(
            f"template {exc.filename or exc.name or name} line {exc.lineno}: {exc.message}"
        ) from None
    check_script_syntax(script, f"template {name} (site {site.name})")
    return script


def check_script_syntax(script: str, where: str) -> None:
    """Refuse a script ``bash -n`` cannot parse: ``InputError`` naming ``where`` and bash's
    first complaint. The script is read from stdin; nothing is written or run."""
    try:
        proc = subprocess.run(
            ["bash", "-n"], input=script.encode("utf-8", "surrogateescape"),
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise InputError(f"{where}: cannot check the rendered script: bash not found") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"{where}: bash -n did not finish within 30s") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        first = lines[0] if lines else f"exit status {proc.returncode}"
        raise InputError(f"{where}: the rendered script is not valid bash: {first[:200]}")
