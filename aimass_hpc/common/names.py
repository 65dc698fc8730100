"""Validated names and identifiers: the one place that says which strings may be a name.

Every identifier-like value (environment variable names, model and alias names, shard keys,
Slurm partition/account/QOS/reservation/feature names, ``#SBATCH`` passthrough values,
reservation options, signal names, site and search names) is checked here, by a **full-string**
match (:func:`re.fullmatch`) of an explicit character class. Never ``re.match(...$)``: ``$``
also matches before a trailing newline, so ``"FOO\\n"`` would pass as a name and split a line
of the job script in two.

Each rule comes in two shapes:

* a pydantic type (``EnvName``, ``SlurmName``, ``ModelName``, ...): ``Annotated[str,
  AfterValidator(...)]`` for spec and config models, so the error carries the key path;
* a plain ``check_*(value, where)`` function raising :class:`~aimass_hpc.common.errors.InputError`
  whose message starts with ``where`` (the key path), for CLI arguments and code paths
  without a model.

Rules for free text (command arguments, environment values, job names, paths, descriptions,
metric names, anything else that is not a name):

* **NUL** is refused everywhere: argv, the environment and the job script cannot carry it.
* **CR** is refused everywhere too: sbatch refuses a script holding a CR-LF pair ("DOS line
  breaks") with a message that names no field, a lone CR rewrites what a terminal or a log shows,
  and no job value needs one. Write ``\\n`` line breaks.
* **LF** (newline) and every other character are allowed in free text: such values are
  shell-quoted by the template layer and reach the job byte for byte. They are never allowed in
  a name; a value shown on a ``#`` comment line goes through the ``|comment`` filter first.

:func:`check_tree` applies the free-text rule to a whole parsed spec (keys and values, at any
depth) and names the first offending key path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator

from aimass_hpc.common.errors import InputError

_SHOWN = 60  # characters of a bad value quoted in a message


def shown(value: Any, limit: int = _SHOWN) -> str:
    """``repr(value)`` clipped to ``limit`` characters (always one line): the one way a message
    quotes a value someone else wrote."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- free text


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a free-text value (NUL, CR), or None."""
    if "\x00" in value:
        return "contains a NUL character (argv, environment and scripts cannot carry it)"
    if "\r" in value:
        return "contains a carriage return (CR); use \\n line breaks (sbatch refuses CR-LF)"
    return None


def check_text(value: str, where: str) -> str:
    """``value`` if it is acceptable free text, else ``InputError`` naming ``where``."""
    problem = text_problem(value)
    if problem:
        raise InputError(f"{where}: {problem}")
    return value


def _validate_text(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Text = Annotated[str, AfterValidator(_validate_text)]
"""A free-text string: anything but NUL and CR (newlines allowed; shell-quoted where used)."""


def _validate_line(value: str) -> str:
    _validate_text(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("contains a line break or another control character (one line only)")
    return value


OneLine = Annotated[str, AfterValidator(_validate_line)]
"""A path, image or module name: free text on one line (a trailing newline is a typo that
would only fail inside the job)."""

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


def key_path(where: str, key: Any) -> str:
    """``where.key``, or ``where[<repr>]`` when ``key`` is not a plain word (one line)."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{shown(key)}]"


def _tree_problems(value: Any, where: str) -> tuple[str, str] | None:
    """(key path, problem) of the first string under ``value`` that breaks the text rule."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (where, problem) if problem else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = key_path(where, key)
            if isinstance(key, str) and (problem := text_problem(key)):
                return path, f"the key {problem.removeprefix('contains ')}"
            found = _tree_problems(item, path)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _tree_problems(item, key_path(where, i))
            if found:
                return found
    return None


def check_tree(value: Any, where: str = "", *, label: str | None = None) -> None:
    """Refuse NUL and CR in every string (keys and values) under ``value``, naming the key path
    (``where.key[0]...``); ``label`` (e.g. the spec file) is put in front of the path."""
    found = _tree_problems(value, where)
    if found:
        path, problem = found
        head = f"{label}: {path}" if label and path else (label or path)
        raise InputError(f"{head}: {problem}")


# --------------------------------------------------------------------------- name rules


@dataclass(frozen=True)
class Rule:
    """A name rule: a full-string pattern, what it names and what it allows (for messages)."""

    what: str
    pattern: str
    allowed: str
    max_length: int | None = None
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.pattern))

    def matches(self, value: Any) -> bool:
        """True when ``value`` is a string the rule accepts as a whole."""
        if not isinstance(value, str) or self.compiled.fullmatch(value) is None:
            return False
        return self.max_length is None or len(value) <= self.max_length

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid name of this kind, or None."""
        if self.matches(value):
            return None
        limit = f", at most {self.max_length} characters" if self.max_length else ""
        return f"{shown(value)} is not a valid {self.what} (use {self.allowed}{limit})"

    def check(self, value: Any, where: str) -> str:
        """``value`` if valid, else ``InputError`` whose message starts with ``where``."""
        problem = self.problem(value)
        if problem:
            raise InputError(f"{where}: {problem}" if where else problem)
        return value

    def validate(self, value: str) -> str:
        """Pydantic ``AfterValidator``: ``ValueError`` (pydantic adds the key path)."""
        problem = self.problem(value)
        if problem:
            raise ValueError(problem)
        return value


_NO_DIGIT_FIRST = "not starting with a digit"
ENV_NAME = Rule(
    "environment variable name", r"[A-Za-z_][A-Za-z0-9_]*", f"A-Z a-z 0-9 _, {_NO_DIGIT_FIRST}"
)
SLURM_NAME = Rule("Slurm name", r"[A-Za-z0-9_.+\-]+", "A-Z a-z 0-9 _ . + -")
CONSTRAINT = Rule(
    "constraint expression", r"[A-Za-z0-9_.+\-&|\[\]*:()!]+", "features and & | [ ] * : ( ) !"
)
_FILE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_FILE_NAME_ALLOWED = "letters, digits, _ . -, not starting with _ . -"
SITE_NAME = Rule("site name", _FILE_NAME, _FILE_NAME_ALLOWED, max_length=128)
SEARCH_NAME = Rule("search name", _FILE_NAME, _FILE_NAME_ALLOWED, max_length=80)
MODEL_NAME = Rule(
    "model name", r"[A-Za-z0-9_][A-Za-z0-9._\-]*",
    "letters, digits, '.', '_' and '-', not starting with '.' or '-'", max_length=128,
)  # fmt: skip
ALIAS_NAME = Rule("alias", MODEL_NAME.pattern, MODEL_NAME.allowed, max_length=MODEL_NAME.max_length)
SHARD_KEY = Rule(
    "shard key", MODEL_NAME.pattern, MODEL_NAME.allowed, max_length=MODEL_NAME.max_length
)
PARAM_NAME = Rule(
    "parameter name", r"[A-Za-z_][A-Za-z0-9_.\-]*", f"letters, digits, _ . -, {_NO_DIGIT_FIRST}"
)
CLASS_NAME = Rule("class name", r"[A-Za-z_][A-Za-z0-9_]*", f"letters, digits, _, {_NO_DIGIT_FIRST}")
TASK_REF = Rule(
    "task reference", r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*", "module:function (ASCII)"
)
SIGNAL = Rule(
    "signal Slurm can send", r"USR1|USR2|TERM|INT|HUP|QUIT|CONT|ALRM|URG|[0-9]{1,2}",
    "USR1, USR2, TERM, INT, HUP, QUIT, CONT, ALRM, URG or a number",
)  # fmt: skip
# sbatch splits #SBATCH lines itself (no shell): no spaces, quotes, '#', '$' or backslash. The
# constraint operators & | * ( ) ! are plain characters there.
SBATCH_VALUE = Rule(
    "#SBATCH value", r"[A-Za-z0-9_.,:=@%+/\-\[\]&|*()!]*",
    "A-Z a-z 0-9 _ . , : = @ % + / - [ ] & | * ( ) !",
)  # fmt: skip
SBATCH_OPTION = Rule("sbatch option name", r"--[a-z][a-z0-9\-]*", "--lowercase-words")
SCONTROL_VALUE = Rule(
    "scontrol value", r"[A-Za-z0-9_.,:+\-\[\]/]+", "A-Z a-z 0-9 _ . , : + - [ ] /"
)
RESERVATION_NAME = Rule(
    "reservation name", r"[A-Za-z0-9_.\-]+", "letters, digits, '.', '_' and '-'", max_length=64
)
MEM_SIZE = Rule("memory size", r"[0-9]+(?:[KMGTkmgt][Bb]?)?", "e.g. 16000, 64G, 1T")
_DEP_ITEM = (
    r"(?:(?:after|afterany|afterok|afternotok|aftercorr|afterburstbuffer)"
    r"(?::[0-9]+(?:_[0-9]+)?(?:\+[0-9]+)?)+|singleton)"
)
DEPENDENCY = Rule(
    "dependency list", rf"{_DEP_ITEM}(?:[,?]{_DEP_ITEM})*", "e.g. afterok:123:124, singleton"
)
_ARRAY_ITEM = r"[0-9]+(?:-[0-9]+(?::[0-9]+)?)?"
ARRAY_RANGE = Rule(
    "array range", rf"{_ARRAY_ITEM}(?:,{_ARRAY_ITEM})*(?:%[0-9]+)?", "e.g. 0-9%2, 1,3,5"
)


EnvName = Annotated[str, AfterValidator(ENV_NAME.validate)]
SlurmName = Annotated[str, AfterValidator(SLURM_NAME.validate)]
Constraint = Annotated[str, AfterValidator(CONSTRAINT.validate)]
SiteName = Annotated[str, AfterValidator(SITE_NAME.validate)]
SearchName = Annotated[str, AfterValidator(SEARCH_NAME.validate)]
ModelName = Annotated[str, AfterValidator(MODEL_NAME.validate)]
AliasName = Annotated[str, AfterValidator(ALIAS_NAME.validate)]
ParamName = Annotated[str, AfterValidator(PARAM_NAME.validate)]
TaskRef = Annotated[str, AfterValidator(TASK_REF.validate)]
ClassName = Annotated[str, AfterValidator(CLASS_NAME.validate)]
MemSize = Annotated[str, AfterValidator(MEM_SIZE.validate)]
Dependency = Annotated[str, AfterValidator(DEPENDENCY.validate)]
ArrayRange = Annotated[str, AfterValidator(ARRAY_RANGE.validate)]


def check_env_name(value: Any, where: str) -> str:
    """An environment variable name (``[A-Za-z_][A-Za-z0-9_]*``, whole string)."""
    return ENV_NAME.check(value, where)


def check_slurm_name(value: Any, where: str) -> str:
    """A Slurm partition, account, QOS, reservation, gres or feature name."""
    return SLURM_NAME.check(value, where)


def check_model_name(value: Any, where: str = "model name") -> str:
    """A repository model name (also the ``[model] name`` of a training spec)."""
    return MODEL_NAME.check(value, where)


def check_alias_name(value: Any, where: str = "alias") -> str:
    """A repository alias name (same characters as a model name)."""
    return ALIAS_NAME.check(value, where)


def check_shard_key(value: Any, where: str = "shard key") -> str:
    """A repository shard key (same characters as a model name)."""
    return SHARD_KEY.check(value, where)


def check_sbatch_value(value: Any, where: str) -> str:
    """A value that can stand on an ``#SBATCH`` line as is (sbatch parses those itself)."""
    return SBATCH_VALUE.check(value, where)


def check_scontrol_value(value: Any, where: str) -> str:
    """A value that may follow ``key=`` on an ``scontrol`` command line."""
    return SCONTROL_VALUE.check(value, where)


def check_signal(value: Any, where: str) -> str:
    """A signal name Slurm's ``--signal`` takes (``SIG`` prefix and case already removed)."""
    return SIGNAL.check(value, where)
