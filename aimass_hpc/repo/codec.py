"""Exact, pickle-free encoding of checkpoint contents: tensors into a pool, the rest into JSON.

A checkpoint holds three *sections*: ``model`` (a state dict), ``optimizer`` (an optimizer
state dict: int keys, tuples, tensors) and ``extra`` (anything a resumed job needs: RNG states,
sampler position, scheduler state). Each section becomes a JSON *tree* in which every tensor or
array is replaced by a reference into a *pool* of raw byte buffers, stored as HDF5 datasets.

The encoding is exact: tuples stay tuples (``random.setstate`` insists), dict keys keep their
type (optimizer states use int keys), floats round-trip through ``repr``, NaN/inf and numpy
scalars keep their bits, and a tensor referenced twice (tied weights) comes back as one object.
No pickle is used, so loading a checkpoint from a shared filesystem cannot execute code.
"""

from __future__ import annotations

import base64
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimass_hpc.common.errors import InputError

SECTIONS = ("model", "optimizer", "extra")

# torch dtypes we store, by name. Sub-byte placeholder and quantized dtypes are refused: their
# bytes alone do not describe the values (quantized tensors need scales and zero points).
TORCH_DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)

# The HDF5 dataset type used to *show* a torch dtype in h5ls/h5dump. Dtypes HDF5 lacks
# (bfloat16, fp8, ...) are stored as unsigned integers of the same width: the bits are kept
# exactly and the logical dtype is recorded in the manifest and the dataset's ``dtype`` attr.
NATURAL_DTYPES = {
    "uint8": "|u1",
    "int8": "|i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<c8",
    "complex128": "<c16",
}
_UINT_BY_SIZE = {1: "|u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_TORCH_DTYPE_SET = frozenset(TORCH_DTYPES)
_DTYPE_NAMES: dict[Any, str] = {}  # torch.dtype -> name, filled on first use
# numpy dtypes a state dict may hold that load() hands back as the same torch dtype.
_NUMPY_AS_TORCH = {v: k for k, v in NATURAL_DTYPES.items()} | {"|b1": "bool"}

# One-key JSON objects with these keys are type markers; user dicts that look like one are
# written in the explicit ``__dict__`` form so they can never be mistaken for a marker.
_MARKERS = frozenset(
    {
        "__tensor__",
        "__ndarray__",
        "__tuple__",
        "__dict__",
        "__bytes__",
        "__bytearray__",
        "__float__",
        "__complex__",
        "__npscalar__",
        "__set__",
        "__frozenset__",
        "__torch_dtype__",
        "__torch_device__",
        "__torch_size__",
        "__ordered__",
    }
)


@dataclass
class Stored:
    """One buffer in the pool: a tensor or array's raw bytes and how to rebuild it."""

    index: int
    name: str  # "<section>/<path>", used in messages and as the HDF5 dataset name
    kind: str  # "torch" | "numpy"
    dtype: str | list  # torch dtype name, or numpy dtype descr (JSON form)
    shape: tuple[int, ...]
    raw: np.ndarray  # 1-D uint8 view of the contiguous bytes
    storage_dtype: str  # numpy dtype string of the HDF5 dataset
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.nbytes = int(self.raw.nbytes)


def _torch() -> Any:
    """torch if the caller already imported it (then its tensors may appear), else None."""
    return sys.modules.get("torch")


def torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> Any:
    import torch

    dt = getattr(torch, name, None)
    if name not in TORCH_DTYPES or not isinstance(dt, torch.dtype):
        raise InputError(f"unsupported tensor dtype {name!r} in checkpoint")
    return dt


def numpy_dtype(descr: Any) -> np.dtype:
    """Inverse of ``np.lib.format.dtype_to_descr`` after a JSON round trip."""

    def fix(d: Any) -> Any:
        if isinstance(d, list):
            return [tuple(fix(x) for x in field) for field in d]
        return d

    return np.lib.format.descr_to_dtype(fix(descr))


class TensorPool:
    """Collects tensors/arrays from all sections; one entry per distinct buffer."""

    def __init__(self) -> None:
        self.items: list[Stored] = []
        self._seen: dict[tuple, int] = {}

    def add_torch(self, t: Any, name: str) -> int:
        # Kept lean: a state dict may hold thousands of tiny tensors (see the benchmark).
        torch = _torch()
        dname = _DTYPE_NAMES.get(t.dtype)
        if dname is None:
            dname = _DTYPE_NAMES[t.dtype] = torch_dtype_name(t.dtype)
        if t.layout is not torch.strided or t.is_nested or t.is_quantized:
            raise InputError(
                f"cannot store tensor '{name}': quantized, sparse and nested tensors are not "
                "supported; convert it to a dense tensor first"
            )
        if dname not in _TORCH_DTYPE_SET:
            raise InputError(f"cannot store tensor '{name}': dtype {dname} is not supported")
        if t.is_meta:
            raise InputError(f"cannot store tensor '{name}': it is on the meta device (no data)")
        shape = tuple(t.shape)
        key = None
        ptr = t.data_ptr()
        if ptr:
            # Same memory, same view -> one stored buffer (tied weights stay tied on load).
            key = (t.device, ptr, dname, shape, t.stride())
            if key in self._seen:
                return self._seen[key]
        natural = NATURAL_DTYPES.get(dname)
        try:
            data = t.detach() if t.requires_grad else t
            if not data.is_cpu:
                data = data.cpu()
            if data.is_complex():
                data = data.resolve_conj()
            if data.is_neg():
                data = data.resolve_neg()
            if not data.is_contiguous():
                data = data.contiguous()
            if natural is not None:
                raw = data.numpy().reshape(-1).view(np.uint8)
            else:
                raw = data.reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError) as exc:  # tensor subclasses (DTensor, fakes, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"cannot store tensor '{name}' ({type(t).__name__}): {first}; save a plain "
                "local tensor (e.g. DTensor.to_local() with save_shard)"
            ) from None
        storage = natural or _UINT_BY_SIZE.get(t.dtype.itemsize, "|u1")
        return self._append(key, name, "torch", dname, shape, raw, storage)

    def add_numpy(self, a: np.ndarray, name: str, as_torch: bool = False) -> int:
        """Add an array; with ``as_torch`` (state dicts) it loads back as a torch tensor."""
        if a.dtype.hasobject:
            raise InputError(f"cannot store array '{name}': object arrays are not supported")
        if as_torch:
            native = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            tname = _NUMPY_AS_TORCH.get(native.str)
            if tname is not None:
                data = np.ascontiguousarray(a, dtype=native)
                raw = data.reshape(-1).view(np.uint8) if data.nbytes else np.empty(0, np.uint8)
                storage = NATURAL_DTYPES.get(tname, "|u1")
                return self._append(None, name, "torch", tname, tuple(a.shape), raw, storage)
        key = None
        if a.nbytes > 0:
            key = ("n", a.__array_interface__["data"][0], a.dtype.str, a.shape, a.strides)
            if key in self._seen:
                return self._seen[key]
        data = np.ascontiguousarray(a)
        raw = data.reshape(-1).view(np.uint8) if data.nbytes else np.empty(0, np.uint8)
        dt = data.dtype
        if dt.kind in "iufc" and dt.byteorder in "=<|" and dt.fields is None:
            storage = dt.newbyteorder("<").str
        else:
            storage = _UINT_BY_SIZE.get(dt.itemsize, "|u1") if dt.kind in "bMm" else "|u1"
        descr = np.lib.format.dtype_to_descr(dt)
        return self._append(key, name, "numpy", descr, tuple(a.shape), raw, storage)

    def _append(
        self,
        key: tuple | None,
        name: str,
        kind: str,
        dtype: Any,
        shape: tuple,
        raw: Any,
        storage: str,
    ) -> int:
        idx = len(self.items)
        self.items.append(Stored(idx, name, kind, dtype, shape, raw, storage))
        if key is not None:
            self._seen[key] = idx
        return idx


def storage_shape(item: Stored) -> tuple[int, ...]:
    """Shape of the HDF5 dataset holding ``item`` (its logical shape when bytes tile it)."""
    itemsize = np.dtype(item.storage_dtype).itemsize
    n = math.prod(item.shape)
    if n * itemsize == item.nbytes:
        return item.shape
    if item.nbytes % itemsize == 0:
        return (item.nbytes // itemsize,)
    return (item.nbytes,)  # caller then stores plain bytes


class Encoder:
    """Turns a nested Python structure into JSON, moving tensors/arrays into ``pool``."""

    def __init__(self, pool: TensorPool) -> None:
        self.pool = pool

    def encode(self, obj: Any, path: str) -> Any:
        torch = _torch()
        if obj is None or isinstance(obj, str | bool):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return obj
            return {"__float__": repr(obj)}
        if torch is not None and isinstance(obj, torch.Tensor):
            return {"__tensor__": self.pool.add_torch(obj, path)}
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": self.pool.add_numpy(obj, path)}
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise InputError(f"cannot store numpy object scalar at '{path}'")
            descr = np.lib.format.dtype_to_descr(obj.dtype)
            return {"__npscalar__": [descr, base64.b64encode(obj.tobytes()).decode()]}
        if isinstance(obj, bytes):
            return {"__bytes__": base64.b64encode(obj).decode()}
        if isinstance(obj, bytearray):
            return {"__bytearray__": base64.b64encode(bytes(obj)).decode()}
        if isinstance(obj, complex):
            return {"__complex__": [self.encode(obj.real, path), self.encode(obj.imag, path)]}
        if torch is not None:
            if isinstance(obj, torch.dtype):
                return {"__torch_dtype__": torch_dtype_name(obj)}
            if isinstance(obj, torch.device):
                return {"__torch_device__": str(obj)}
            if isinstance(obj, torch.Size):
                return {"__torch_size__": [int(x) for x in obj]}
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return {"__tuple__": [self.encode(v, _child(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, _child(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, set | frozenset):
            tag = "__set__" if isinstance(obj, set) else "__frozenset__"
            return {tag: [self.encode(v, _child(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, Mapping):
            return self._encode_mapping(obj, path)
        raise InputError(
            f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} at '{path}': "
            "checkpoints hold tensors, arrays, numbers, strings, bytes, lists, tuples and dicts"
        )

    def _encode_mapping(self, obj: Mapping, path: str) -> Any:
        ordered = isinstance(obj, OrderedDict)
        keys = list(obj.keys())
        marker_like = len(keys) == 1 and keys[0] in _MARKERS
        plain = all(isinstance(k, str) for k in keys) and not marker_like
        if plain:
            out: Any = {k: self.encode(v, _child(path, k)) for k, v in obj.items()}
        else:
            out = {
                "__dict__": [
                    [self.encode(k, path), self.encode(v, _child(path, k))] for k, v in obj.items()
                ]
            }
        if ordered:
            out = {"__ordered__": out}
        return out


def _child(path: str, key: Any) -> str:
    """Human-readable path of a nested value: ``optimizer/state.0.exp_avg``."""
    return f"{path}{key}" if path.endswith("/") else f"{path}.{key}"


Resolver = Callable[[int], Any]


def decode(tree: Any, tensor: Resolver, array: Resolver) -> Any:
    """Inverse of :meth:`Encoder.encode`; ``tensor(i)``/``array(i)`` materialize pool items."""
    if isinstance(tree, list):
        return [decode(v, tensor, array) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((key, val),) = tree.items()
        if key in _MARKERS:
            return _decode_marker(key, val, tensor, array)
    return {k: decode(v, tensor, array) for k, v in tree.items()}


def _decode_marker(key: str, val: Any, tensor: Resolver, array: Resolver) -> Any:
    if key == "__tensor__":
        return tensor(val)
    if key == "__ndarray__":
        return array(val)
    if key == "__tuple__":
        return tuple(decode(v, tensor, array) for v in val)
    if key == "__dict__":
        return {_hashable(decode(k, tensor, array)): decode(v, tensor, array) for k, v in val}
    if key == "__ordered__":
        return OrderedDict(decode(val, tensor, array).items())
    if key == "__bytes__":
        return base64.b64decode(val)
    if key == "__bytearray__":
        return bytearray(base64.b64decode(val))
    if key == "__float__":
        return float(val)
    if key == "__complex__":
        return complex(decode(val[0], tensor, array), decode(val[1], tensor, array))
    if key == "__npscalar__":
        descr, data = val
        return np.frombuffer(base64.b64decode(data), dtype=numpy_dtype(descr))[0]
    if key == "__set__":
        return {decode(v, tensor, array) for v in val}
    if key == "__frozenset__":
        return frozenset(decode(v, tensor, array) for v in val)
    import torch

    if key == "__torch_dtype__":
        return torch_dtype(val)
    if key == "__torch_device__":
        return torch.device(val)
    if key == "__torch_size__":
        return torch.Size(val)
    raise AssertionError(key)  # unreachable: key is in _MARKERS


def _hashable(key: Any) -> Any:
    return key if not isinstance(key, list) else tuple(key)


def encode_sections(
    state_dict: Mapping[str, Any] | None,
    optimizer: Any = None,
    extra: Any = None,
) -> tuple[dict[str, Any], TensorPool]:
    """Encode the three sections; returns ``(trees, pool)``.

    ``state_dict`` must map strings to tensors (numpy arrays are converted to tensors when
    torch is loaded, so ``load`` always hands back torch tensors). A torch ``_metadata``
    attribute (module versions used by ``load_state_dict``) is kept.
    """
    pool = TensorPool()
    enc = Encoder(pool)
    trees: dict[str, Any] = {}
    if state_dict is not None:
        if not isinstance(state_dict, Mapping):
            raise InputError(
                f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}"
            )
        model: dict[str, Any] = {}
        for key, value in state_dict.items():
            if not isinstance(key, str):
                raise InputError(f"state_dict keys must be strings, got {key!r}")
            if isinstance(value, np.ndarray):  # stored so that load() gives a torch tensor
                idx = pool.add_numpy(value, f"model/{key}", as_torch=True)
                model[key] = {
                    "__tensor__" if pool.items[idx].kind == "torch" else "__ndarray__": idx
                }
                continue
            model[key] = enc.encode(value, f"model/{key}")
        trees["model"] = model
        meta = getattr(state_dict, "_metadata", None)
        if meta is not None:
            trees["model_metadata"] = enc.encode(meta, "model/_metadata")
    if optimizer is not None:
        trees["optimizer"] = enc.encode(optimizer, "optimizer/")
    if extra is not None:
        trees["extra"] = enc.encode(extra, "extra/")
    return trees, pool
