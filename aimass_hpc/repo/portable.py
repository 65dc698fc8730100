"""Export to and import from other checkpoint formats: safetensors, torch.save, HDF5 archive.

Exports are written under a temporary name next to the target and renamed into place, so an
interrupted export never leaves a half-written file where a complete one was expected.
Imports of torch files use ``weights_only=True`` (plus numpy arrays): no arbitrary pickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.common.fsutil import publish_file
from aimass_hpc.repo import h5format
from aimass_hpc.repo.codec import encode_sections
from aimass_hpc.repo.records import Checkpoint

FORMATS = ("safetensors", "torch", "hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_TORCH_EXPORT = "aimass-checkpoint"


def _atomic(target: Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    if target.exists() and not overwrite:
        raise ConflictError(f"{target} exists; choose another path or overwrite it explicitly")
    if not target.parent.is_dir():
        raise NotFoundError(f"directory {target.parent} does not exist")
    return publish_file(target, write)


def _untied(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, t in state_dict.items():
        if not hasattr(t, "untyped_storage"):
            raise InputError(f"state dict entry {key!r} is not a tensor; export as torch instead")
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr and ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def export(
    ckpt: Checkpoint, target: Path, fmt: str, compression: str | None, overwrite: bool
) -> Path:
    """Write ``ckpt`` to ``target`` in format ``fmt`` (see :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if compression is not None and fmt != "hdf5":
        raise InputError("compression applies to the hdf5 export format only")
    meta = dict(ckpt.version.metadata)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = _untied(ckpt.state_dict)
        info = {"aimass_ref": ckpt.version.ref, "aimass_metadata": json.dumps(meta, default=str)}
        return _atomic(target, overwrite, lambda p: save_file(tensors, str(p), metadata=info))
    if fmt == "torch":
        import torch

        obj = {
            "format": _TORCH_EXPORT,
            "state_dict": dict(ckpt.state_dict),
            "optimizer": ckpt.optimizer,
            "extra": ckpt.extra,
            "metadata": json.dumps(meta, default=str),
        }
        return _atomic(target, overwrite, lambda p: torch.save(obj, p))
    trees, pool = encode_sections(ckpt.state_dict, ckpt.optimizer, ckpt.extra)
    meta.setdefault("exported_from", ckpt.version.ref)

    def write(p: Path) -> None:
        h5format.write_file(p, pool=pool, trees=trees, metadata=meta, compression=compression)

    return _atomic(target, overwrite, write)


def read(path: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Read ``(state_dict, optimizer, extra, metadata)`` from a torch, safetensors or HDF5 file."""
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_HDF5_SIGNATURE):
        cf = h5format.CheckpointFile(path, str(path))
        sd, opt, extra = cf.load(mmap=False, verify=True)
        return sd, opt, extra, dict(cf.metadata)
    if _looks_like_safetensors(head, path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
        meta = {}
        if "aimass_metadata" in info:
            try:
                meta = json.loads(info["aimass_metadata"])
            except ValueError:
                meta = {}
        return load_file(str(path)), None, None, meta
    return _read_torch(path)


def _looks_like_safetensors(head: bytes, path: Path) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def _read_torch(path: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    import numpy as np
    import torch

    # numpy arrays (numpy RNG states) are allowed besides tensors and plain containers.
    safe = [
        np.ndarray,
        np.dtype,
        np.dtypes.UInt32DType,
        np.dtypes.Int64DType,
        np.dtypes.Float64DType,
        np.dtypes.Float32DType,
        np.dtypes.UInt8DType,
    ]
    # np.core only on numpy 1.x: touching it on numpy 2 imports a deprecated shim.
    reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
    try:
        with torch.serialization.safe_globals([reconstruct, *safe]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for "not a torch file"/unsafe content
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot import {path}: not a safe torch checkpoint ({msg})") from exc
    if isinstance(obj, Mapping) and obj.get("format") == _TORCH_EXPORT:
        meta = json.loads(obj.get("metadata") or "{}")
        return obj["state_dict"], obj.get("optimizer"), obj.get("extra"), meta
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None, None, {}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            sd = obj.get(key)
            if isinstance(sd, Mapping) and all(isinstance(v, torch.Tensor) for v in sd.values()):
                opt = obj.get("optimizer") or obj.get("optimizer_state_dict")
                return dict(sd), opt, None, {}
    raise InputError(
        f"cannot import {path}: expected a state dict (name -> tensor) or a dict with a "
        "'state_dict'/'model' entry"
    )
