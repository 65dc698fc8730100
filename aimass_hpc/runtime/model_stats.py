"""What a finished model costs: FLOPs of one sample's forward pass and peak memory.

Recorded with every final model (built-in trainer, script mode's ``Job.finish``, ``aimass models
import`` with a recipe) so that ``aimass models search --flops ... --memory ... --type ...``
can find it. One sample is a batch of 1 built from the recipe's ``input_shape``/``input_dtype``
(the serving recipe, see :mod:`aimass_hpc.serve.codec`), or the first training input.

What is counted:

* ``flops_per_sample``: floating-point operations of one forward pass on that sample, as
  ``torch.utils.flop_counter.FlopCounterMode`` counts them (a multiply-add is 2 FLOPs; only
  operators it knows, the matmuls and convolutions that dominate, are counted; elementwise
  ops such as activations are not).
* ``peak_memory_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` during that forward
  (parameters, buffers, input and every live intermediate, as the caching allocator saw
  them). On CPU, where no allocator keeps a peak: parameters + buffers (each storage once) +
  the input + the sum of every submodule's output tensors during the forward, an upper bound
  of the activations (a real run frees some before others are made).

A sharded model (FSDP: parameters are DTensors, each rank holds a piece) is measured as the
whole model it stands for, the one a server loads: every rank runs the same forward together
(collective: FSDP gathers each layer's parameters, so the matmuls are the whole model's and
the FLOPs are counted as for the unsharded module), and the peak memory is the CPU bound above
with each parameter at its global size, on GPUs too (the allocator's peak on one rank would
be that rank's share, not what the model needs on one device).

Measurement never fails a run: a model that cannot run on the sample gets None for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from aimass_hpc.repo.metadata import MODEL_TYPES

_DTYPES = {
    "bool": torch.bool,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

# Losses that say what a model is for (wrappers around them count: SlowLoss(CrossEntropy)).
_CLASSIFIER_LOSSES: tuple[type[nn.Module], ...] = (
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.MultiLabelSoftMarginLoss,
    nn.MultiMarginLoss,
    nn.MultiLabelMarginLoss,
)
_REGRESSOR_LOSSES: tuple[type[nn.Module], ...] = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.GaussianNLLLoss,
    nn.PoissonNLLLoss,
)
_EMBEDDING_LOSSES: tuple[type[nn.Module], ...] = (
    nn.CosineEmbeddingLoss,
    nn.TripletMarginLoss,
    nn.MarginRankingLoss,
)


def __getattr__(name: str) -> Any:
    """``MODEL_TYPES`` (re-exported), loaded on first use like the check above."""
    if name == "MODEL_TYPES":
        from aimass_hpc.repo.metadata import MODEL_TYPES

        return MODEL_TYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_TYPES", "ModelStats", "measure", "model_type_of", "sample_input"]


@dataclass(frozen=True)
class ModelStats:
    """Measured cost of a model; None where it could not be measured."""

    flops_per_sample: float | None = None
    peak_memory_bytes: int | None = None


def sample_input(recipe: Mapping[str, Any] | None) -> torch.Tensor | None:
    """One sample of the model's input (batch of 1) from the recipe's input shape, else None.

    ``input_shape`` is the shape without the batch axis; a dimension of any size (``-1`` or
    null) leaves nothing definite to measure, so that gives None too. Zeros of
    ``input_dtype`` (default float32): the counts do not depend on the values.
    """
    if not isinstance(recipe, Mapping):
        return None
    shape = recipe.get("input_shape")
    if not isinstance(shape, list | tuple):
        return None
    dims = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            return None
        dims.append(d)
    dtype = _DTYPES.get(str(recipe.get("input_dtype") or "float32"))
    if dtype is None:
        return None
    return torch.zeros((1, *dims), dtype=dtype)


def sample_from_dataset(dataset: Any) -> torch.Tensor | None:
    """The first input of a map-style ``(input, target)`` dataset as a batch of 1, else None."""
    try:
        item = dataset[0]
        x = item[0] if isinstance(item, tuple | list) else item
    except Exception:  # any dataset may refuse; then there is nothing to measure with
        return None
    if not isinstance(x, torch.Tensor):
        return None
    return x.detach().unsqueeze(0).clone()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) module output."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def _resident_bytes(module: nn.Module) -> int:
    """Parameters and buffers, each storage once (tied weights are one tensor)."""
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        # A DTensor (FSDP) counts at its global size: numel() is the whole tensor's.
        local = t.device.type != "meta" and not _is_dtensor(t)
        key = t.untyped_storage().data_ptr() if local else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += _nbytes(t)
    return total


@contextlib.contextmanager
def _activation_counter(module: nn.Module, into: list[int]) -> Iterator[None]:
    """Add the bytes of every submodule's outputs (leaf modules only, no double count)."""

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        into[0] += sum(_nbytes(t) for t in _tensors(out))

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves or [module]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed: nothing is sharded
        return False
    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """True for a module whose parameters are sharded over ranks (FSDP DTensors)."""
    return any(_is_dtensor(p) for p in module.parameters())


def measure(
    module: nn.Module, sample: torch.Tensor | None, device: torch.device | None = None
) -> ModelStats:
    """FLOPs per sample and peak memory of ``module`` on ``sample``; empty when sample is None.

    ``device`` defaults to where the module's parameters are. The module runs once in eval
    mode without gradients; its training mode is put back. See the module docs for what is
    counted. A sharded (FSDP) module is measured as the whole model, and then this is
    collective: every rank calls it with the same sample (or every rank with None).
    """
    if sample is None:
        return ModelStats()
    from torch.utils.flop_counter import FlopCounterMode

    if device is None:
        first = next(iter((*module.parameters(), *module.buffers())), None)
        device = first.device if first is not None else torch.device("cpu")
        if first is not None and _is_dtensor(first):
            device = first.to_local().device  # type: ignore[attr-defined]
    x = sample.to(device)
    was_training = module.training
    activations = [0]
    # The allocator's peak only describes a model that lives whole on this device.
    on_cuda = device.type == "cuda" and not is_sharded(module)
    try:
        module.eval()
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, _activation_counter(module, activations):
            module(x)
        if on_cuda:
            torch.cuda.synchronize(device)
            peak = int(torch.cuda.max_memory_allocated(device))
        else:
            peak = _resident_bytes(module) + _nbytes(x) + activations[0]
        flops = float(counter.get_total_flops())
    except Exception:  # a model that cannot run on the sample: nothing measured
        return ModelStats()
    finally:
        module.train(was_training)
    return ModelStats(flops_per_sample=flops, peak_memory_bytes=peak)


def model_type_of(
    *,
    declared: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    loss: Any = None,
    model: nn.Module | None = None,
    sample: torch.Tensor | None = None,
) -> str:
    """The model's type (one of :data:`MODEL_TYPES`): declared (the task's ``model_type``),
    else the recipe's ``model_type``, else read from the loss, else ``"other"``.

    Cross-entropy on integer inputs through an embedding is a language model; other
    classification losses a classifier; MSE/L1/Huber a regressor; metric losses an embedding.
    """
    # Imported here, not at the top: the trainer imports this module before its first step,
    # and repo.metadata brings pydantic (tens of ms of every rank's start-up).
    from aimass_hpc.repo.metadata import check_model_type

    if declared is not None:
        return str(check_model_type(declared, "task model_type"))
    if isinstance(recipe, Mapping) and recipe.get("model_type") is not None:
        return str(check_model_type(recipe.get("model_type"), "recipe.model_type"))
    parts = list(loss.modules()) if isinstance(loss, nn.Module) else []
    if any(isinstance(p, _CLASSIFIER_LOSSES) for p in parts):
        tokens = sample is not None and not sample.is_floating_point()
        embeds = model is not None and any(isinstance(m, nn.Embedding) for m in model.modules())
        return "language-model" if tokens and embeds else "classifier"
    if any(isinstance(p, _REGRESSOR_LOSSES) for p in parts):
        return "regressor"
    if any(isinstance(p, _EMBEDDING_LOSSES) for p in parts):
        return "embedding"
    return "other"


def stats_from_recipe(recipe: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``flops_per_sample``/``peak_memory_bytes``/``model_type`` of the model a recipe builds
    with ``state_dict`` loaded (for ``aimass models import``); None where unknown.

    The module is rebuilt on the CPU as serving would (:mod:`aimass_hpc.serve.model_loader`);
    a recipe that cannot be built is an error of the caller's choosing (it propagates).
    """
    from aimass_hpc.repo.metadata import check_model_type
    from aimass_hpc.serve.model_loader import build_module, parse_recipe

    parsed = parse_recipe(recipe)
    model_type = check_model_type(recipe.get("model_type"), "recipe.model_type")
    module = build_module(
        parsed.factory, parsed.kwargs, state_dict, torch.device("cpu"), parsed.pythonpath
    )
    stats = measure(module, sample_input(recipe), torch.device("cpu"))
    return {
        "flops_per_sample": stats.flops_per_sample,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "model_type": model_type,
    }
