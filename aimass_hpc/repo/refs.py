"""Model references (``NAME``, ``NAME:7``, ``NAME:latest``, ``NAME@prod``): the one parser.

Every place that takes a model reference -- the repository API, ``aimass models``, ``aimass
serve`` / ``endpoints`` / ``bench``, the serve replica, the search driver -- parses it here,
with :meth:`Ref.parse`, and compares parsed :class:`Ref` values, never the text: ``NAME``,
``NAME:latest`` and ``NAME@latest`` are one reference (``Ref(NAME)``).

Names, aliases and shard keys become file names on a shared filesystem, so they are restricted
to a portable character set: letters, digits, ``.``, ``_`` and ``-``, not starting with a dot
or a dash (no hidden files, no option look-alikes), at most 128 characters. The rule itself
lives in :mod:`aimass_hpc.common.names` (``MODEL_NAME``, a full-string match), shared with the
train, search and serve specs, so a name a spec accepts is one the repository accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.names import ALIAS_NAME, MODEL_NAME, SHARD_KEY, Rule, shown

LATEST = "latest"
FORMS = "NAME, NAME:VERSION, NAME:latest or NAME@ALIAS"
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


def _in(where: str, message: str) -> InputError:
    """``InputError`` whose one-line message starts with ``where`` (when given)."""
    return InputError(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of ``version`` / ``alias`` or neither (= latest).

    ``latest`` is never stored as an alias: ``Ref.parse("m@latest") == Ref("m")``.
    """

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str | Ref, where: str = "") -> Ref:
        """Parse ``NAME``, ``NAME:VERSION``, ``NAME:latest``, ``NAME@ALIAS`` or ``NAME@latest``.

        A bad reference is an ``InputError`` with a one-line message starting with ``where``
        (e.g. ``serve.ref`` or ``target``). A ``Ref`` is returned as is.

        >>> Ref.parse("resnet:3")
        Ref(name='resnet', version=3, alias=None)
        """
        if isinstance(text, Ref):
            return text
        if not isinstance(text, str) or not text:
            raise _in(where, f"invalid model reference {shown(text)}: expected {FORMS}")
        name, at, alias = text.partition("@")
        name, colon, version = name.partition(":")
        if at and colon:
            raise _in(
                where,
                f"invalid model reference {shown(text)}: give :VERSION or @ALIAS, not both",
            )
        try:
            check_name(name)
            if at:
                check_name(alias, "alias")
        except InputError as exc:
            raise _in(where, str(exc)) from None
        if at:
            return cls(name, alias=None if alias == LATEST else alias)
        if not colon or version == LATEST:
            return cls(name)
        if not (version.isascii() and version.isdigit()) or int(version) < 1:
            raise _in(
                where,
                f"invalid version {shown(version)} in model reference {shown(text)}: "
                "expected a positive integer or 'latest'",
            )
        return cls(name, version=int(version))

    @property
    def is_latest(self) -> bool:
        """True for ``NAME`` (= ``NAME:latest`` = ``NAME@latest``)."""
        return self.version is None and self.alias in (None, LATEST)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def parse_ref(ref: str | Ref, where: str = "") -> Ref:
    """:meth:`Ref.parse` as a function (the repository API's historical name)."""
    return Ref.parse(ref, where)


@dataclass(frozen=True)
class VersionRange:
    """``NAME:LO..HI``: versions LO to HI inclusive; either end may be left open (``:..7``,
    ``:3..``), not both. Only deletes take ranges."""

    name: str
    lo: int | None
    hi: int | None

    @classmethod
    def parse(cls, text: str, where: str = "") -> VersionRange | None:
        """The range ``text`` names, None if it is no range (no ``..`` after the colon)."""
        if not isinstance(text, str) or "@" in text:
            return None
        name, colon, span = text.partition(":")
        if not colon or ".." not in span:
            return None
        try:
            check_name(name)
        except InputError as exc:
            raise _in(where, str(exc)) from None
        lo_text, _, hi_text = span.partition("..")
        ends: list[int | None] = []
        for end in (lo_text, hi_text):
            if end and not (end.isascii() and end.isdigit() and int(end) >= 1):
                raise _in(
                    where,
                    f"invalid version range {shown(text)}: expected NAME:LO..HI with positive "
                    "integers (either end may be left out)",
                )
            ends.append(int(end) if end else None)
        lo, hi = ends
        if lo is None and hi is None:
            raise _in(where, f"invalid version range {shown(text)}: give at least one end")
        if lo is not None and hi is not None and lo > hi:
            raise _in(where, f"invalid version range {shown(text)}: {lo} is after {hi}")
        return cls(name, lo, hi)

    def __str__(self) -> str:
        lo = "" if self.lo is None else str(self.lo)
        hi = "" if self.hi is None else str(self.hi)
        return f"{self.name}:{lo}..{hi}"
