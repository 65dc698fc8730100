"""Asynchronous checkpoint snapshots: reused host buffers, still a consistent copy.

The step loop of an asynchronous save only copies the state into host buffers kept from the
previous save (:class:`HostBuffers`); the background thread writes that copy. These tests
prove the copy is one (later optimizer steps do not reach it, also while the real repository
writes it in the background), that buffers are reused rather than reallocated, and that the
FSDP path (``sharded.local_state``) fills them with this rank's pieces and their layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aimass_hpc.runtime import sharded
from aimass_hpc.runtime.checkpoint import (
    HostBuffers,
    PendingSave,
    RepositoryStore,
    SaveInfo,
    TrainState,
)


def _trained(width: int = 16) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _step(model, opt)
    return model, opt


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(8, next(model.parameters()).shape[1])).square().mean().backward()
    opt.step()


def _clone(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def test_snapshot_is_a_copy_that_later_steps_do_not_change() -> None:
    model, opt = _trained()
    buffers = HostBuffers()
    expected_model = _clone(model.state_dict())
    expected_opt = _clone(opt.state_dict())
    snap_model = buffers.take(model.state_dict(), "model/")
    snap_opt = buffers.take(opt.state_dict(), "optimizer/")
    for _ in range(3):
        _step(model, opt)
    assert not _same(model.state_dict(), expected_model)  # training did move on
    assert _same(snap_model, expected_model)
    assert _same(snap_opt, expected_opt)  # Adam moments and step counts too
    assert snap_opt["param_groups"] == opt.state_dict()["param_groups"]  # non-tensors kept


def test_buffers_are_reused_and_reallocated_only_when_the_shape_changes() -> None:
    model, opt = _trained()
    buffers = HostBuffers()
    first = buffers.take(model.state_dict(), "model/")
    held = buffers.nbytes
    assert held == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    _step(model, opt)
    second = buffers.take(model.state_dict(), "model/")
    # The same memory, now holding the newer values: no fresh allocation per save.
    assert all(first[k].data_ptr() == second[k].data_ptr() for k in first)
    assert _same(second, _clone(model.state_dict()))
    assert buffers.nbytes == held
    grown = buffers.take({"0.weight": torch.zeros(32, 16)}, "model/")
    assert grown["0.weight"].shape == (32, 16) and torch.equal(
        grown["0.weight"], torch.zeros(32, 16)
    )
    # Non-contiguous sources copy by value into contiguous buffers.
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(buffers.take({"t": t}, "x/")["t"], t)


def test_background_write_saves_the_snapshot_not_the_later_weights(tmp_path: Path) -> None:
    """The asynchronous path end to end on the real repository: snapshot, write in a
    thread while the optimizer keeps stepping, load: the saved values are the snapshot's."""
    model, opt = _trained(width=64)
    store = RepositoryStore(tmp_path / "repo", "net", tmp_path / "run")
    (tmp_path / "run").mkdir()
    buffers = HostBuffers()
    for step in (1, 2):
        expected = _clone(model.state_dict())
        expected_opt = _clone(opt.state_dict())
        state = TrainState(
            model=buffers.take(model.state_dict(), "model/"),
            optimizer=buffers.take(opt.state_dict(), "optimizer/"),
            extra={"step": step},
        )
        pending = PendingSave(lambda s=state: store.save(s, SaveInfo()), step)
        for _ in range(5):
            _step(model, opt)  # training goes on while the write runs
        ref = pending.wait()  # the next snapshot reuses the buffers only after this
        assert ref is not None
        loaded = store.load(ref)
        assert _same(loaded.model, expected)
        assert torch.equal(
            loaded.optimizer["state"][0]["exp_avg"],  # type: ignore[index]
            expected_opt["state"][0]["exp_avg"],  # type: ignore[index]
        )
        assert store.latest_ref() == ref and loaded.step == step


def test_fsdp_local_state_fills_the_buffers_with_this_ranks_pieces(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from aimass_hpc.runtime.fsdp import FSDPOptions, shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        model = shard_model(
            nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)), torch.device("cpu"), FSDPOptions()
        )
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        _step(model, opt)
        fresh, fresh_opt, layout = sharded.local_state(model, opt)
        buffers = HostBuffers()
        sd, sd_opt, buffered_layout = sharded.local_state(model, opt, buffers)
        assert buffered_layout == layout and layout["model/0.weight"]["global_shape"] == [8, 8]
        assert _same(sd, fresh) and _same(sd_opt, fresh_opt)
        assert all(not hasattr(v, "placements") for v in sd.values())  # plain local tensors
        _step(model, opt)
        assert _same(sd, fresh)  # a copy: the step did not reach it
        again, _, _ = sharded.local_state(model, opt, buffers)
        assert again["0.weight"].data_ptr() == sd["0.weight"].data_ptr()
        assert not _same(again, fresh)
    finally:
        dist.destroy_process_group()
