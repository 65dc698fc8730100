"""Resharding: whole tensors (or any rank's region of them) from a parallel sharded version.

A parallel sharded version (``kind = "sharded"`` with a ``layout`` per shard) holds, in every
rank's shard file, that rank's *local piece* of each sharded tensor; the commit manifest
records, per shard and per tensor name (the codec's path, ``model/fc.weight``,
``optimizer/state.0.exp_avg``), the tensor's global shape and the piece's offsets in it.
Tensors without a layout entry are replicated (the same on every rank: scalars such as Adam's
``step``, ``extra``): shard 0's copy is used.

:func:`assemble` builds the state of one reader: for each laid-out tensor it asks ``select``
which region the reader wants (the whole tensor for an unsharded load, or this rank's shard
under a new world size) and copies only the overlapping parts of each saved piece into it.
The pieces are mapped from the files, so a rank reads the bytes of its own region only
(rounded to pages), never the whole checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from aimass_hpc.common.errors import IntegrityError
from aimass_hpc.repo.codec import _child

# (name, global shape) -> (offsets, shape) of the region wanted, or None for the whole tensor.
Select = Callable[[str, tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]] | None]


def walk(tree: Any, path: str, out: dict[str, Any]) -> None:
    """Collect every tensor of a decoded tree under the codec's path names."""
    if isinstance(tree, torch.Tensor):
        out[path] = tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            walk(v, _child(path, k), out)
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            walk(v, _child(path, i), out)


def replace(tree: Any, path: str, new: Mapping[str, Any]) -> Any:
    """``tree`` with the tensors at the paths in ``new`` replaced (structure kept)."""
    if isinstance(tree, torch.Tensor):
        return new.get(path, tree)
    if isinstance(tree, Mapping):
        out = type(tree)() if isinstance(tree, dict) else {}
        for k, v in tree.items():
            out[k] = replace(v, _child(path, k), new)
        if hasattr(tree, "_metadata"):
            out._metadata = tree._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(tree, list):
        return [replace(v, _child(path, i), new) for i, v in enumerate(tree)]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(replace(v, _child(path, i), new) for i, v in enumerate(tree))
    return tree


def _tensors(section: str, data: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if data is None:
        return out
    if section == "model":
        for k, v in data.items():
            walk(v, f"model/{k}", out)
    else:
        walk(data, f"{section}/", out)
    return out


def assemble(
    label: str,
    pieces: list[tuple[Any, Any, Any]],
    layouts: list[Mapping[str, Any]],
    select: Select | None = None,
) -> tuple[Any, Any, Any]:
    """``(state_dict, optimizer, extra)`` of one reader from every shard's decoded pieces."""
    found = [
        {
            **_tensors("model", sd),
            **_tensors("optimizer", opt),
        }
        for sd, opt, _ in pieces
    ]
    names: dict[str, list[int]] = {}
    for layout in layouts:
        for name, entry in layout.items():
            names.setdefault(name, [int(x) for x in entry["global_shape"]])
    built: dict[str, Any] = {}
    for name, gshape in names.items():
        region = select(name, tuple(gshape)) if select else None
        off, shape = region if region is not None else ((0,) * len(gshape), tuple(gshape))
        out: torch.Tensor | None = None
        covered = 0
        for r, layout in enumerate(layouts):
            entry = layout.get(name)
            if entry is None:
                continue
            piece = found[r].get(name)
            if piece is None:
                raise IntegrityError(f"{label}: shard {r} lacks tensor {name!r} its layout names")
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            src, dst = [], []
            for po, pn, ro, rn in zip(entry["offsets"], piece.shape, off, shape, strict=True):
                lo, hi = max(po, ro), min(po + pn, ro + rn)
                if hi <= lo:
                    break
                src.append(slice(lo - po, hi - po))
                dst.append(slice(lo - ro, hi - ro))
            else:
                part = piece[tuple(src)]
                out[tuple(dst)] = part
                covered += part.numel()
        if out is None:
            continue
        if covered != out.numel():
            raise IntegrityError(
                f"{label}: the shards cover {covered} of {out.numel()} elements of {name!r}"
            )
        built[name] = out
    sd, opt, extra = pieces[0]
    if sd is not None:
        sd = _model_replace(pieces[0][0], built)
    if opt is not None:
        opt = replace(opt, "optimizer/", built)
    return sd, opt, extra


def _model_replace(sd: Any, built: Mapping[str, Any]) -> Any:
    out = type(sd)()
    for k, v in sd.items():
        out[k] = replace(v, f"model/{k}", built)
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata
    return out
