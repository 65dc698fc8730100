"""Model references (``name``, ``name:7``, ``name:latest``, ``name@prod``).

Names, aliases and shard keys become file names on a shared filesystem, so they are restricted
to a portable character set: letters, digits, ``.``, ``_`` and ``-``, not starting with a dot
or a dash (no hidden files, no option look-alikes), at most 128 characters. The rule itself
lives in :mod:`aimass_hpc.common.names` (``MODEL_NAME``), shared with the train, search and serve
specs, so a name a spec accepts is one the repository accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import ALIAS_NAME, MODEL_NAME, SHARD_KEY, Rule

LATEST = "latest"
_RULES: dict[str, Rule] = {"model name": MODEL_NAME, "alias": ALIAS_NAME, "shard key": SHARD_KEY}


def check_name(value: str, what: str = "model name") -> str:
    """Return ``value`` if it is a valid name for a model, alias or shard key, else raise."""
    rule = _RULES.get(what, MODEL_NAME)
    problem = rule.problem(value)
    if problem:
        raise InputError(f"invalid {what}: {problem}")
    return value


def check_alias(alias: str) -> str:
    """Validate an alias name that may be *set* (``latest`` is computed, never stored)."""
    check_name(alias, "alias")
    if alias == LATEST:
        raise InputError("alias 'latest' is reserved: it always means the newest version")
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of ``version`` / ``alias`` or neither (= latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def is_latest(self) -> bool:
        return self.version is None and self.alias in (None, LATEST)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(ref: str | Ref) -> Ref:
    """Parse ``name``, ``name:VERSION``, ``name:latest`` or ``name@ALIAS``.

    >>> parse_ref("resnet:3")
    Ref(name='resnet', version=3, alias=None)
    """
    if isinstance(ref, Ref):
        return ref
    if not isinstance(ref, str) or not ref:
        raise InputError(f"invalid model reference {ref!r}: expected name, name:N or name@alias")
    if "@" in ref:
        name, _, alias = ref.partition("@")
        check_name(name)
        check_name(alias, "alias")
        return Ref(name, alias=None if alias == LATEST else alias)
    if ":" in ref:
        name, _, version = ref.partition(":")
        check_name(name)
        if version == LATEST:
            return Ref(name)
        if not (version.isascii() and version.isdigit()) or int(version) < 1:
            raise InputError(
                f"invalid version {version!r} in model reference {ref!r}: "
                "expected a positive integer or 'latest'"
            )
        return Ref(name, version=int(version))
    return Ref(check_name(ref))
