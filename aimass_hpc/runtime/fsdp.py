"""FSDP2 (``torch.distributed.fsdp.fully_shard``): models bigger than one GPU.

Every parameter becomes a DTensor sharded over the ranks on dimension 0; a forward gathers one
layer at a time, a backward reduce-scatters its gradients. What this module decides:

* **What is one shard unit** (``wrap``): by default every direct or nested child module that
  holds parameters itself (a "layer": ``nn.Linear``, a transformer block's own parameters are
  then gathered together), innermost first, then the root; or, when the task names module
  class names (``[train] fsdp_wrap = ["Block"]``), every module of those classes, then the root.
* **Mixed precision**: on GPUs bf16 parameters for compute with fp32 gradient reduction
  (``MixedPrecisionPolicy``); off on the CPU, where bf16 matmuls are slow and inexact.
* **Activation checkpointing** (recompute each wrapped unit's activations in backward) and
  **CPU offload** of the sharded parameters and optimizer state, both optional.

The optimizer: FSDP2 replaces each parameter by a new DTensor parameter, so an optimizer built
before sharding would step the old tensors. :func:`rebuild_param_groups` swaps the new
parameters into its groups (matched by name), so both orders work: build the optimizer first
and call ``job.wrap(model, optimizer)``, or shard first and build it over the new parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class FSDPOptions:
    """How to shard: the spec's ``[train]`` fields ``fsdp_wrap``, ``mixed_precision``,
    ``activation_checkpointing``, ``cpu_offload``."""

    wrap: list[str] = field(default_factory=list)
    mixed_precision: str = "auto"  # auto (bf16 on GPUs), bf16, off
    activation_checkpointing: bool = False
    cpu_offload: bool = False


def is_sharded(model: nn.Module) -> bool:
    """True once ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def units(model: nn.Module, wrap: list[str]) -> list[nn.Module]:
    """The submodules to shard one by one (innermost first; the root excluded)."""
    if wrap:
        names = set(wrap)
        found = {type(m).__name__ for m in model.modules()}
        missing = sorted(names - found)
        if missing:
            raise ValueError(
                f"fsdp_wrap: no module of class {', '.join(missing)} in the model "
                f"(classes: {', '.join(sorted(found))})"
            )
        chosen = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    else:
        chosen = [
            m
            for m in model.modules()
            if m is not model and any(True for _ in m.parameters(recurse=False))
        ]
    return list(reversed(chosen))  # children before parents: a parent then skips their params


def shard_model(model: nn.Module, device: torch.device, options: FSDPOptions) -> nn.Module:
    """Apply ``fully_shard`` to ``model``'s units, then the root (in place); returns it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return model
    kwargs: dict[str, Any] = {}
    mp = options.mixed_precision
    if mp not in ("auto", "bf16", "off"):
        raise ValueError(f"mixed_precision must be auto, bf16 or off, not {mp!r}")
    if mp == "bf16" or (mp == "auto" and device.type == "cuda"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if options.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    chosen = units(model, options.wrap)
    if options.activation_checkpointing:
        _checkpoint_activations(model, chosen)
    for unit in chosen:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _checkpoint_activations(model: nn.Module, chosen: list[nn.Module]) -> None:
    """Recompute ``chosen`` units' activations in backward instead of keeping them.

    The composable ``checkpoint`` keeps parameter names (a wrapper module would add a
    ``_checkpoint_wrapped_module.`` prefix, and checkpoints would no longer match the model).
    """
    from torch.distributed._composable import checkpoint

    for unit in chosen or [model]:
        checkpoint(unit)


def rebuild_param_groups(
    optimizer: torch.optim.Optimizer, before: dict[int, str], model: nn.Module
) -> None:
    """Point ``optimizer``'s groups at ``model``'s (new, sharded) parameters.

    ``before`` maps ``id(old parameter)`` to its name in ``model``. Optimizer state made
    before sharding (none, normally) cannot follow the shards: it is refused.
    """
    if optimizer.state:
        raise RuntimeError(
            "the optimizer already has state: wrap the model with FSDP before the first step"
        )
    now = dict(model.named_parameters())
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = before.get(id(p))
            if name is None:
                if any(p is q for q in now.values()):
                    params.append(p)  # already a sharded parameter
                    continue
                raise RuntimeError("the optimizer holds a parameter that is not the model's")
            params.append(now[name])
        group["params"] = params


def param_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` (taken before sharding replaces the parameters)."""
    return {id(p): n for n, p in model.named_parameters()}
