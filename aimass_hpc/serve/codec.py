"""Tensor wire formats for the predict API: JSON nested lists and binary ``.npy``.

Everything a client sends passes through here before it reaches the model. Every way a body
can be wrong (not JSON, ragged lists, strings, a lying ``.npy`` header, a wrong shape or dtype,
too many rows) becomes a :class:`BadInput` with an HTTP status and a one-line message; nothing
here may raise anything else for bad input, so the service answers 4xx instead of crashing.

``.npy`` headers are parsed by hand and the payload length is checked against the header
*before* anything is allocated, so a 100-byte body that claims a terabyte array costs nothing.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimass_hpc.common.names import shown

JSON_MEDIA_TYPE = "application/json"
NPY_MEDIA_TYPE = "application/x-npy"
# Media types accepted as a binary .npy body.
NPY_MEDIA_TYPES = frozenset({NPY_MEDIA_TYPE, "application/octet-stream"})

# Numeric dtypes a request may name or carry; anything else (object, str, complex) is refused.
ALLOWED_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)

_NPY_MAGIC = b"\x93NUMPY"


class BadInput(Exception):
    """A request body the service refuses: ``status`` is the HTTP code, ``str()`` the reason."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What one sample looks like: ``shape`` without the batch axis (None = any size).

    ``shape`` None means the recipe did not say and nothing could be inferred: any batch is
    passed to the model, and the model's own complaint becomes the 422.
    """

    shape: tuple[int | None, ...] | None
    dtype: np.dtype

    def describe(self) -> str:
        """The expected batch shape as text, e.g. ``[N, 3, 32, 32] float32``."""
        if self.shape is None:
            return f"[N, ...] {self.dtype.name}"
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"[N{', ' if dims else ''}{dims}] {self.dtype.name}"

    def example(self, rows: int = 1) -> np.ndarray | None:
        """A zero batch of ``rows`` samples (wildcard dims take size 1): the warm-up input."""
        if self.shape is None:
            return None
        return np.zeros((rows, *(1 if d is None else d for d in self.shape)), dtype=self.dtype)


def _dtype_from_name(name: Any, where: str) -> np.dtype:
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise BadInput(f"{where}: unsupported dtype {name!r}; use one of {sorted(ALLOWED_DTYPES)}")
    return np.dtype(name)


def decode_json(body: bytes) -> np.ndarray:
    """Parse ``{"inputs": [[...], ...], "dtype": "float32"?}`` into an array.

    With ``dtype`` every value must fit it exactly (see :func:`_fit_dtype`); without it the
    dtype is inferred and :func:`check_batch` holds the values to the model's dtype.
    """
    try:
        doc = _loads(body)
    except RecursionError:
        raise BadInput("body is not valid JSON: nested too deeply", 400) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of >4300 digits
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"body is not valid JSON: {reason}", 400) from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadInput('JSON body must be an object with an "inputs" field')
    extra = set(doc) - {"inputs", "dtype"}
    if extra:
        raise BadInput(f"unknown field(s) in JSON body: {sorted(extra)}")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise BadInput('"inputs" must be a (nested) list of numbers')
    dtype = _dtype_from_name(doc["dtype"], '"dtype"') if doc.get("dtype") is not None else None
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError):
        raise BadInput(_NOT_NUMBERS) from None
    if arr.dtype.kind not in "biuf":
        # object (ragged, None, integers beyond 64 bits), str, bytes: nothing a model can take.
        raise BadInput(_NOT_NUMBERS)
    if arr.dtype.kind != "b" and (b"true" in body or b"false" in body):
        # numpy would silently read true as 1 next to numbers. After the checks above the only
        # place these bare words can be is a boolean inside "inputs" (the other strings in the
        # document are field names and a dtype name): refuse the mix rather than guess.
        raise BadInput('"inputs" mix true/false with numbers: send all booleans or all numbers')
    if dtype is None:
        return arr
    return _fit_dtype(arr, inputs, dtype)


_NOT_NUMBERS = (
    '"inputs" must be a rectangular nested list of numbers '
    "(no strings, nulls or integers beyond 64 bits)"
)


def _loads(body: bytes) -> Any:
    """``json.loads``, through orjson (when installed) where that gives the same document.

    The standard parser spends about 0.3 us per number: a 16 x 256 float body costs 1.3 ms,
    several times the forward of a small model. orjson parses it ~10x faster and builds the
    same Python objects, except that it reads integer literals beyond 64 bits as floats where
    ``json`` keeps exact ints (which this API refuses). Bodies with such a literal -- any run
    of 19+ digits not after a decimal point -- and everything orjson rejects (NaN/Infinity
    tokens, a BOM, lone surrogates, deep nesting) go to ``json.loads``, so what is accepted,
    what is refused and every error message stay those of the standard parser.
    """
    if _orjson is not None and type(body) is bytes and not _has_long_integer(body):
        try:
            return _orjson.loads(body)
        except _orjson.JSONDecodeError:
            pass  # the standard parser decides, with its own message
    return json.loads(body)


def _has_long_integer(body: bytes) -> bool:
    # A run of 19+ digits whose preceding byte is not "." (an integer part or an exponent):
    # with digits mapped to "0", "." kept and all else to " ", two C-speed substring scans.
    shape = body.translate(_DIGIT_SHAPE)
    return shape.startswith(_LONG_RUN) or b" " + _LONG_RUN in shape


_LONG_RUN = b"0" * 19
_DIGIT_SHAPE = bytes(48 if 48 <= c <= 57 else 46 if c == 46 else 32 for c in range(256))


_orjson: Any
try:  # optional: only the speed of the JSON body parser depends on it
    import orjson as _orjson
except ImportError:  # pragma: no cover - the standard parser alone
    _orjson = None

# Above this magnitude float64 cannot hold every integer: JSON integers that numpy read as
# float64 (because floats were next to them) may have been rounded.
_FLOAT64_EXACT_INT = 2**53


def value_range(dtype: np.dtype) -> str:
    """What values ``dtype`` holds exactly, as text for error messages."""
    if dtype.kind == "b":
        return "true/false, or 0/1"
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return f"integers from {info.min} to {info.max}"
    return f"finite numbers of magnitude up to {float(np.finfo(dtype).max):.6g}"


def _misfit(arr: np.ndarray, bad: np.ndarray, dtype: np.dtype, where: str) -> BadInput:
    """The 422 for the first value of ``arr`` flagged in ``bad``."""
    index = np.unravel_index(int(np.flatnonzero(bad)[0]), arr.shape)
    value = arr[index].item()
    at = "[" + "][".join(str(int(i)) for i in index) + "]"
    count = int(bad.sum())
    more = f"; {count} values do not fit" if count > 1 else ""
    return BadInput(
        f"{where} value {value!r} at {at} does not fit {dtype.name} ({value_range(dtype)}){more}"
    )


def _fit_dtype(arr: np.ndarray, inputs: list[Any], dtype: np.dtype) -> np.ndarray:
    """``arr`` (what numpy inferred from ``inputs``) as ``dtype``, or a 422 naming the value.

    Exact or refused: no integer wraps (1000 as int8), no negative becomes unsigned, no float
    is truncated into an integer dtype, NaN/inf never become integers, no finite number
    overflows to inf in a float dtype, and booleans take only 0 and 1. Float dtypes round as
    floats always do.
    """
    where = '"inputs"'
    if arr.size == 0:
        return arr.astype(dtype)
    if dtype.kind == "b":
        if arr.dtype.kind == "b":
            return arr
        bad = ~((arr == 0) | (arr == 1))  # NaN compares unequal: refused too
        if bad.any():
            raise _misfit(arr, bad, dtype, where)
        return arr.astype(dtype)
    if arr.dtype.kind == "b":
        return arr.astype(dtype)  # true/false are exactly 1/0 in any numeric dtype
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore"):
            if arr.dtype.kind == "f":
                ok = np.isfinite(arr) & (np.floor(arr) == arr)
                ok &= (arr >= info.min) & (arr <= info.max)
            else:
                ok = (arr >= info.min) & (arr <= info.max)
        if not ok.all():
            raise _misfit(arr, ~ok, dtype, where)
        if arr.dtype.kind == "f" and np.abs(arr).max() >= _FLOAT64_EXACT_INT:
            # Convert from the parsed Python numbers, which are exact (and all integral).
            try:
                return np.array(inputs, dtype=dtype)
            except (OverflowError, ValueError, TypeError):
                raise BadInput(
                    f"{where} values do not fit {dtype.name} ({value_range(dtype)})"
                ) from None
        return arr.astype(dtype)
    # float dtypes
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadInput(f"{where} contain NaN or infinity")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = arr.astype(dtype)
    bad = ~np.isfinite(cast)
    if bad.any():
        raise _misfit(arr, bad, dtype, where)
    return cast


def decode_npy(body: bytes) -> np.ndarray:
    """Parse a ``.npy`` body without trusting its header; the result may be read-only."""
    if not body.startswith(_NPY_MAGIC) or len(body) < 10:
        raise BadInput("body is not a .npy array (bad magic)", 400)
    major = body[6]
    if major == 1:
        hlen = int.from_bytes(body[8:10], "little")
        start = 10
    elif major in (2, 3):
        if len(body) < 12:
            raise BadInput("body is not a .npy array (truncated header)", 400)
        hlen = int.from_bytes(body[8:12], "little")
        start = 12
    else:
        raise BadInput(f"unsupported .npy format version {major}", 400)
    if hlen > _NPY_MAX_HEADER or start + hlen > len(body):
        raise BadInput("body is not a .npy array (truncated header)", 400)
    shape, dtype, fortran = _npy_header(bytes(body[start : start + hlen]))
    count = math.prod(shape)
    payload = memoryview(body)[start + hlen :]
    if count * dtype.itemsize != len(payload):
        raise BadInput(
            f".npy payload is {len(payload)} bytes, header {shape} {dtype.name} needs "
            f"{count * dtype.itemsize}",
            400,
        )
    arr = np.frombuffer(payload, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


_NPY_MAX_HEADER = 65536
_NPY_MAX_DIMS = 32
# Largest element count times item size numpy can index, with a margin: beyond it even an
# empty array (one axis 0) of that shape cannot be made, and numpy says so with a ValueError.
_NPY_MAX_EXTENT = 2**62
# The only descr strings np.save writes for the allowed dtypes (any byte order).
_NPY_DESCR = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")


@functools.lru_cache(maxsize=256)
def _npy_header(text: bytes) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) of a .npy header; cached, clients repeat their shapes.

    Every field is checked before anything is built from it: ``descr`` must be the plain
    descr of an allowed dtype (never handed to ``np.dtype`` otherwise: a descr like
    ``(10**12,)f4`` or a structured list is refused as text), ``fortran_order`` a bool, and
    ``shape`` a tuple of at most 32 non-negative ints whose extent numpy can represent.
    """
    try:
        header = ast.literal_eval(text.decode("latin1"))
    except Exception:  # ValueError, SyntaxError, TypeError ({[1]: 2}), MemoryError, ...
        raise BadInput("body is not a .npy array (unreadable header)", 400) from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise BadInput("body is not a .npy array (bad header keys)", 400)
    shape, descr, fortran = header["shape"], header["descr"], header["fortran_order"]
    if not isinstance(fortran, bool):
        raise BadInput(f".npy header has fortran_order {fortran!r}, not True or False", 400)
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadInput(f".npy header has an invalid shape {shown(shape, 80)}", 400)
    if len(shape) > _NPY_MAX_DIMS:
        raise BadInput(f".npy header has {len(shape)} axes, at most {_NPY_MAX_DIMS}", 400)
    if not isinstance(descr, str):
        raise BadInput(f"unsupported dtype {shown(descr, 80)} in .npy body")
    if not _NPY_DESCR.fullmatch(descr):
        allowed = sorted(ALLOWED_DTYPES)
        raise BadInput(f"unsupported dtype {shown(descr, 80)} in .npy body; use one of {allowed}")
    dtype = np.dtype(descr)
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= _NPY_MAX_EXTENT:
        raise BadInput(f".npy header shape {shown(shape, 80)} is too large", 400)
    return shape, dtype, fortran


def check_batch(arr: np.ndarray, spec: InputSpec, max_rows: int) -> np.ndarray:
    """Check a decoded batch against the model's input spec; returns it in the model dtype."""
    # spec.describe() only on the error paths: it costs as much as the checks themselves.
    if spec.shape is None:
        if arr.ndim < 1:
            raise BadInput(f"inputs have shape {list(arr.shape)}, expected {spec.describe()}")
    elif arr.ndim != len(spec.shape) + 1:
        raise BadInput(f"inputs have shape {list(arr.shape)}, expected {spec.describe()}")
    else:
        for axis, (got, exp) in enumerate(zip(arr.shape[1:], spec.shape, strict=True), start=1):
            if exp is not None and got != exp:
                raise BadInput(
                    f"inputs have shape {list(arr.shape)}, expected {spec.describe()} "
                    f"(axis {axis} is {got})"
                )
    rows = arr.shape[0]
    if rows == 0:
        raise BadInput("inputs hold no samples (batch axis is 0)")
    if rows > max_rows:
        raise BadInput(f"{rows} samples in one request, the limit is {max_rows}", 413)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadInput("inputs contain NaN or infinity")
    if arr.dtype != spec.dtype:
        if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
            raise BadInput(f"inputs are {arr.dtype.name}, the model takes {spec.dtype.name}")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = arr.astype(spec.dtype)
        out_of_range = BadInput(
            f"input values are out of the {spec.dtype.name} range ({value_range(spec.dtype)})"
        )
        if spec.dtype.kind == "f" and not np.isfinite(cast).all():
            raise out_of_range
        if spec.dtype.kind in "iu" and not np.array_equal(cast, arr):
            raise out_of_range
        arr = cast
    return np.ascontiguousarray(arr)


def encode_json(outputs: np.ndarray, meta: dict[str, Any]) -> bytes:
    """The JSON predict response: outputs as nested lists plus their shape and dtype."""
    doc = {"outputs": outputs.tolist(), "shape": list(outputs.shape), "dtype": outputs.dtype.name}
    doc.update(meta)
    # A model may overflow to inf/NaN on finite inputs: written as the NaN/Infinity tokens
    # Python's and JavaScript's parsers accept (the .npy format carries them exactly).
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_npy(arr: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (the binary predict format, both directions).

    The same bytes as ``np.save(..., allow_pickle=False)``; the header is built once per
    (dtype, shape) and cached, since np.save's Python-level header code costs more than
    copying a small batch.
    """
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        return _np_save(arr)  # np.save refuses it (allow_pickle=False): the same error
    return _npy_header_bytes(arr.dtype, arr.shape) + arr.tobytes()


def _np_save(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=512)
def _npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    # The format module's own header writer, fed what np.save feeds it for a C-ordered array.
    fmt = np.lib.format
    header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    try:
        fmt.write_array_header_1_0(buf, header)
    except ValueError:  # a header over 64 KiB: np.save switches to format 2.0 as well
        buf = io.BytesIO()
        fmt.write_array_header_2_0(buf, header)
    return buf.getvalue()


def media_type_of(content_type: str | None) -> str:
    """The bare media type of a Content-Type header (``application/json; charset=x`` -> ...)."""
    if not content_type:
        return JSON_MEDIA_TYPE
    return content_type.split(";", 1)[0].strip().lower()


def wants_npy(accept: str | None, request_media: str) -> bool:
    """Answer in .npy when asked for it, or when the request was .npy and JSON was not asked."""
    accept = (accept or "").lower()
    if NPY_MEDIA_TYPE in accept:
        return True
    if JSON_MEDIA_TYPE in accept:
        return False
    return request_media in NPY_MEDIA_TYPES


def json_schema_for(spec: InputSpec, max_rows: int) -> dict[str, Any]:
    """JSON schema of ``inputs`` for this model: nested arrays of the exact sizes."""
    item: dict[str, Any] = {"type": "integer" if spec.dtype.kind in "biu" else "number"}
    if spec.shape is None:
        return {"type": "array", "minItems": 1, "maxItems": max_rows}
    for d in reversed(spec.shape):
        item = {"type": "array", "items": item}
        if d is not None:
            item |= {"minItems": d, "maxItems": d}
    return {"type": "array", "items": item, "minItems": 1, "maxItems": max_rows}


def shape_of(value: Sequence[int | None] | None) -> tuple[int | None, ...]:
    """Normalise a recipe's ``input_shape`` (``-1``/``None`` mean any size)."""
    if value is None:
        raise ValueError("input_shape is missing")
    out: list[int | None] = []
    for d in value:
        if d is None or d == -1:
            out.append(None)
        elif isinstance(d, int) and not isinstance(d, bool) and d > 0:
            out.append(d)
        else:
            raise ValueError(f"input_shape entry {d!r} is not a positive int, -1 or null")
    return tuple(out)
