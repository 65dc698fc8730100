"""Units: the one home for the sizes and counts people type.

Two conventions, each with its own parser, so that every caller says which one it means:

* **Memory sizes are binary, as Slurm reads them**: ``K``/``M``/``G``/``T`` are powers of 1024
  (``64G`` is 65536 MiB, exactly what ``sbatch --mem=64G`` asks for). The IEC spellings
  ``KiB``/``MiB``/``GiB``/``TiB`` mean the same and are accepted too. ``KB``/``MB``/``GB``/``TB``
  are *also* read as powers of 1024, on purpose: Slurm itself does (``--mem=1GB`` is 1024 MiB),
  site configs and job specs already say ``512GB``, and refusing them would reject values that
  sbatch takes, while reading them as 10^9 would make one string mean two sizes within one
  tool, which is the confusion this module exists to end. Letters are case-insensitive
  (Slurm takes ``16g``).
* **Counts (FLOPs, parameters, metric values) are decimal, SI**: ``k``/``M``/``G``/``T``/``P`` are
  powers of 1000 (``5G`` FLOPs is 5e9; ``K`` is taken for ``k``). There is no ``i`` and no
  ``B`` form: a count is not a size in bytes, and a lower-case ``m`` would read as milli.

Every parser matches the whole string (no blanks around it, no trailing newline), takes ASCII
digits only (``float()`` alone would take fullwidth or Arabic-Indic digits) and raises a
one-line :class:`~aimass_hpc.common.errors.InputError` naming the option.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from aimass_hpc.common.errors import InputError

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

# Powers of 1024 by unit letter (memory) and of 1000 by SI prefix (counts).
_BINARY = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
_DECIMAL = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}

# A non-negative decimal number with an optional (short) exponent; [0-9] is ASCII only.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?"
# re.ASCII: without it IGNORECASE folds the Kelvin sign (U+212A) to "k".
_FLAGS = re.ASCII | re.IGNORECASE
# A size: bytes (bare or B), or K/M/G/T alone, with B (Slurm's KB..TB), with iB (IEC) or i.
_MEMORY = re.compile(rf"(?P<num>{_NUMBER})(?:(?P<unit>[KMGT])I?B?|B)?", _FLAGS)
# Slurm's own --mem syntax: whole numbers, K/M/G/T with an optional B; sbatch refuses 1.5G,
# 64GiB and a bare 100B, and a site's or spec's value is written verbatim into #SBATCH --mem.
_SLURM_MEM = re.compile(r"(?P<num>[0-9]+)(?:(?P<unit>[KMGT])B?)?", _FLAGS)
_COUNT = re.compile(rf"(?P<sign>[+-]?)(?P<num>{_NUMBER})(?P<unit>[kKMGTP]?)", re.ASCII)

MEMORY_HINT = "a size like 512M, 8G or 8GiB (K/M/G/T are powers of 1024, as in Slurm)"
SLURM_MEMORY_HINT = "a Slurm memory size like 16000, 64G or 1T (in MiB without a unit)"
COUNT_HINT = "a number like 2e9, 300M or 5G (k/M/G/T/P are powers of 1000)"


def _match(pattern: re.Pattern[str], text: object, option: str, hint: str) -> re.Match[str]:
    m = pattern.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InputError(f"invalid {option} {_shown(text)}: expected {hint}")
    return m


def _shown(text: object) -> str:
    """``text`` quoted; non-ASCII escaped, so a look-alike (a Kelvin sign for K) shows as one."""
    return repr(text) if isinstance(text, str) and text.isascii() else ascii(text)


def parse_memory_bytes(text: str, option: str) -> int:
    """A memory size in bytes: ``512M``, ``8G`` = ``8GB`` = ``8GiB``, ``1.5GiB``, ``2e9``.

    Binary units, as Slurm reads them (see the module doc); a bare number is bytes. Fractions
    of a byte are dropped.
    """
    m = _match(_MEMORY, text, option, MEMORY_HINT)
    unit = (m.group("unit") or "").upper()
    return int(Decimal(m.group("num")) * _BINARY[unit])


def parse_slurm_mem_mb(text: str, option: str) -> int:
    """A memory size as ``sbatch --mem`` takes it, in MiB: ``16000``, ``64G``, ``512GB``, ``1T``.

    Whole numbers with K/M/G/T (powers of 1024, optional ``B``, any case); a bare number is MiB,
    as in Slurm. ``K`` rounds down to whole MiB. Refuses what sbatch would refuse (``1.5G``,
    ``64GiB``, ``100B``), since the text goes into the job script unchanged.
    """
    m = _match(_SLURM_MEM, text, option, SLURM_MEMORY_HINT)
    unit = (m.group("unit") or "M").upper()
    return int(m.group("num")) * _BINARY[unit] // MIB


def parse_count(text: str, option: str, *, signed: bool = False) -> float:
    """A count such as FLOPs: ``2e9``, ``300M``, ``5G`` (SI: powers of 1000), a plain number.

    ``signed`` allows a leading ``-``/``+`` (metric values may be negative; FLOPs may not).
    """
    m = _match(_COUNT, text, option, COUNT_HINT)
    if m.group("sign") and not signed:
        raise InputError(f"invalid {option} {_shown(text)}: must not have a sign")
    value = float(m.group("num")) * _DECIMAL[m.group("unit")]
    if not math.isfinite(value):
        raise InputError(f"invalid {option} {_shown(text)}: too large")
    return -value if m.group("sign") == "-" else value


Range = tuple[float | None, float | None]


def parse_range(text: str, what: str, unit: str = "metric") -> Range:
    """``LO..HI`` or ``LO:HI`` with either end optional (``0.9..``, ``..8GiB``, ``:5G``); a
    single value is exact; both ends inclusive. ``unit`` says how an end reads: "count"
    (decimal, ``5G`` = 5e9), "memory" (binary, as Slurm: ``8G`` = 8 GiB) or "metric" (a count
    that may be negative)."""

    def one(part: str) -> float:
        if unit == "memory":
            return float(parse_memory_bytes(part, what))
        return parse_count(part, what, signed=unit == "metric")

    sep = ".." if ".." in text else ":" if ":" in text else None
    if sep is None:
        value = one(text)
        return (value, value)
    lo, _, hi = text.partition(sep)
    return (one(lo) if lo else None, one(hi) if hi else None)
