"""Parallel sharded checkpoints of FSDP (DTensor) state: save N ranks, load on M.

Design choice: we take each rank's pieces ourselves (``DTensor.to_local()`` plus the global
offset that ``placements``/``device_mesh`` give) and write them with the repository's own
shard files, rather than plugging a StorageWriter/StorageReader into
``torch.distributed.checkpoint``. Why: the repository already has everything DCP's storage
layer would need to re-implement (per-rank HDF5 shard files written in parallel, per-tensor
checksums, a manifest committed atomically by one rename, retention, lineage); its files are
self-describing and readable without torch.distributed (``aimass models show``, unsharded
loads for serving on one process); and DCP's planner would add a collective metadata exchange
per save whose only product (global shape + offsets per piece) we compute locally. What we
keep from DCP is its model: a checkpoint is a set of named pieces, each with the tensor's
global shape and the piece's offsets (DCP's ``ChunkStorageMetadata``), and a load asks, per
tensor, for the region the reader's own placement covers (resharding), copying only the
overlapping parts of each saved piece (see :mod:`aimass_hpc.repo.reshard`).

Names are the repository codec's paths: ``model/<key>`` and ``optimizer/state.<i>.<name>``
(``i`` the parameter's index in the optimizer's groups, the same for every world size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from aimass_hpc.repo.codec import _child
from aimass_hpc.runtime.checkpoint import HostBuffers

Layout = dict[str, dict[str, list[int]]]


def _is_dtensor(obj: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


def _offsets(t: Any) -> list[int]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return [int(x) for x in offsets]


def localize(obj: Any, path: str, layout: Layout, buffers: HostBuffers | None = None) -> Any:
    """A CPU copy of ``obj`` with each DTensor replaced by this rank's piece (in ``layout``).

    With ``buffers`` the copies go into its reused host buffers (asynchronous saves; call
    ``buffers.sync()`` before reading them), else into fresh tensors.
    """
    if isinstance(obj, torch.Tensor):
        if _is_dtensor(obj):
            layout[path] = {"global_shape": list(obj.shape), "offsets": _offsets(obj)}
            obj = obj.to_local()  # type: ignore[attr-defined]
        if buffers is not None:
            return buffers.copy(obj, path)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        out = {k: localize(v, _child(path, k), layout, buffers) for k, v in obj.items()}
        return type(obj)(out) if isinstance(obj, dict) else out
    if isinstance(obj, list):
        return [localize(v, _child(path, i), layout, buffers) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(localize(v, _child(path, i), layout, buffers) for i, v in enumerate(obj))
    return obj


def local_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    buffers: HostBuffers | None = None,
) -> tuple[dict[str, Any], Any, Layout]:
    """This rank's pieces of the model and optimizer state, and their layout.

    ``buffers``: copy into these reused host buffers (see
    :class:`~aimass_hpc.runtime.checkpoint.HostBuffers`) instead of fresh tensors.
    """
    layout: Layout = {}
    sd = {k: localize(v, f"model/{k}", layout, buffers) for k, v in model.state_dict().items()}
    opt = localize(optimizer.state_dict(), "optimizer/", layout, buffers) if optimizer else None
    if buffers is not None:
        buffers.sync()
    return sd, opt, layout


class Targets:
    """Where each saved tensor goes on this rank: the DTensor placement of the live model.

    :meth:`select` is the repository's ``select`` callback (this rank's region of each
    tensor); :meth:`restore` turns the loaded pieces back into DTensors.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.by_name: dict[str, Any] = {
            f"model/{k}": v for k, v in model.state_dict().items() if _is_dtensor(v)
        }
        self.params: list[Any] = []
        if optimizer is not None:
            for group in optimizer.param_groups:
                self.params += list(group["params"])
        self.chosen: dict[str, Any] = {}

    def template(self, name: str, shape: tuple[int, ...]) -> Any:
        t = self.by_name.get(name)
        if t is None and name.startswith("optimizer/state."):
            parts = name[len("optimizer/state.") :].split(".", 1)
            if parts[0].isdigit() and int(parts[0]) < len(self.params):
                t = self.params[int(parts[0])]
        if t is None or not _is_dtensor(t) or tuple(t.shape) != tuple(shape):
            return None
        return t

    def select(self, name: str, shape: tuple[int, ...]) -> Any:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        t = self.template(name, shape)
        if t is None:
            return None  # whole tensor (not sharded in this run)
        self.chosen[name] = t
        local, offsets = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)
        return tuple(int(x) for x in offsets), tuple(int(x) for x in local)

    def _dtensor(self, name: str, piece: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor

        t = self.chosen[name]
        dev = t.to_local().device
        return DTensor.from_local(
            piece.to(dev),
            t.device_mesh,
            t.placements,
            run_check=False,
            shape=t.shape,
            stride=t.stride(),
        )

    def restore(self, sd: Mapping[str, Any], optimizer: Any) -> tuple[dict[str, Any], Any]:
        """The loaded state with this rank's pieces as DTensors, ready for ``load_state_dict``."""
        from aimass_hpc.repo.reshard import walk

        found: dict[str, Any] = {}
        for k, v in sd.items():
            walk(v, f"model/{k}", found)
        if optimizer is not None:
            walk(optimizer, "optimizer/", found)
        built = {n: self._dtensor(n, t) for n, t in found.items() if n in self.chosen}
        from aimass_hpc.repo.reshard import replace

        model = {k: replace(v, f"model/{k}", built) for k, v in sd.items()}
        opt = replace(optimizer, "optimizer/", built) if optimizer is not None else None
        return model, opt
