"""Compressed exports of stored models: a cheaper dtype, int8 linear layers, ONNX.

Every compression works on the module the version's recipe rebuilds (see
:mod:`aimass_hpc.serve.model_loader`), and every compressed state dict comes with a recipe of
its own so that it serves through the same loader:

- ``cast``: floating tensors to bfloat16/float16 (others kept). The recipe's factory becomes
  :func:`cast_model`, which builds the original module in that dtype and casts floating inputs
  to it and outputs back to float32 (hooks: the state dict keys stay those of the original).
- ``int8``: linear layers quantized with torchao (``Int8DynamicActivationInt8WeightConfig``,
  or ``Int8WeightOnlyConfig`` for ``int8-weight-only``). Its int8 weights and per-row scales
  are stored as plain tensors (``L.weight`` int8, ``L.weight_scale`` float32) and the recipe's
  factory becomes :func:`int8_model`, which swaps each ``nn.Linear`` for :class:`Int8Linear`
  (plain torch, the same arithmetic): torchao is needed to quantize, not to serve.
- ``onnx``: ``torch.onnx.export`` (dynamic batch axis), then onnxruntime must reproduce the
  torch outputs on random inputs within a tolerance before the file is published.

The accuracy delta of a compression is measured between the original module and the module
rebuilt from the *compressed* state dict and recipe (what serving would run): max and mean
absolute output difference on K random batches drawn from the recipe's ``input_shape``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from aimass_hpc.common.errors import AimassError, ConflictError, InputError, NotFoundError
from aimass_hpc.common.fsutil import publish_file
from aimass_hpc.repo.records import Checkpoint, Version

# Accepted spellings -> the torch dtype name recorded in lineage and recipes.
DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}
# --quantize scheme -> torchao config class name.
QUANT_SCHEMES = {
    "int8": "Int8DynamicActivationInt8WeightConfig",
    "int8-weight-only": "Int8WeightOnlyConfig",
}
ONNX_TOLERANCE = 1e-4  # absolute; fp32 torch vs onnxruntime differ by ~1e-6 on small nets
SAMPLES = 4
BATCH = 8
SEED = 0
_CAST_FACTORY = "aimass_hpc.repo.compress:cast_model"
_INT8_FACTORY = "aimass_hpc.repo.compress:int8_model"


@dataclass
class Compressed:
    """A compressed state dict, the recipe that rebuilds it, and what it cost."""

    source: str  # the source version's ref
    state_dict: dict[str, torch.Tensor]
    recipe: dict[str, Any]
    settings: dict[str, Any]  # what was done: dtype or quantize, quantizer, samples, seed
    size_bytes: int
    source_size_bytes: int
    delta: dict[str, float]  # max_abs, mean_abs output difference vs the original
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {
            "source": self.source,
            **self.settings,
            "size_bytes": self.size_bytes,
            "source_size_bytes": self.source_size_bytes,
            "max_abs_diff": self.delta["max_abs"],
            "mean_abs_diff": self.delta["mean_abs"],
        }


@dataclass
class OnnxReport:
    """The outcome of :func:`export_onnx`."""

    source: str
    path: Path
    size_bytes: int
    source_size_bytes: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    samples: int

    def report(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "source": self.source,
            "format": "onnx",
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "source_size_bytes": self.source_size_bytes,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "tolerance": self.tolerance,
            "samples": self.samples,
        }


# ----------------------------------------------------------------------------- validation


def parse_dtype(text: str) -> str:
    """``bf16``/``fp16`` (or ``bfloat16``/``float16``/``half``) -> the torch dtype name."""
    name = DTYPES.get(str(text).strip().lower())
    if name is None:
        raise InputError(f"--dtype {text!r} is not supported: use bf16 or fp16")
    return name


def parse_scheme(text: str) -> str:
    """A ``--quantize`` scheme (see :data:`QUANT_SCHEMES`), checked."""
    scheme = str(text).strip().lower()
    if scheme not in QUANT_SCHEMES:
        raise InputError(f"--quantize {text!r} is not supported: use {' or '.join(QUANT_SCHEMES)}")
    return scheme


def source_recipe(version: Version, what: str) -> dict[str, Any]:
    """The version's recipe with a definite ``input_shape``; one line naming the ref if not."""
    recipe = version.recipe
    if not isinstance(recipe, Mapping) or not recipe.get("factory"):
        raise InputError(
            f"{what} needs the model's recipe to rebuild it, and {version.ref} has none "
            "(save or import it with a recipe)"
        )
    if recipe.get("factory") in (_CAST_FACTORY, _INT8_FACTORY) and what != "--format onnx":
        given = recipe.get("kwargs")
        kwargs: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        done = kwargs.get("dtype") or kwargs.get("scheme") or "int8"
        parent = f"its parent {version.parent}" if version.parent else "the original"
        raise InputError(f"{version.ref} is already compressed ({done}); compress {parent}")
    if _shape(recipe) is None:
        raise InputError(
            f"{what} draws random inputs from the recipe's input_shape, and that of "
            f"{version.ref} is missing or has a dimension of any size"
        )
    return dict(recipe)


def _shape(recipe: Mapping[str, Any]) -> tuple[int, ...] | None:
    shape = recipe.get("input_shape")
    if not isinstance(shape, list | tuple) or not shape:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        return None
    return tuple(shape)


# ---------------------------------------------------------------------------- measurement


def tensor_bytes(state_dict: Mapping[str, Any]) -> int:
    """Bytes of the tensors of a state dict (what the weights weigh, without a file)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values() if torch.is_tensor(t))


def random_inputs(
    recipe: Mapping[str, Any], samples: int = SAMPLES, batch: int = BATCH, seed: int = SEED
) -> list[torch.Tensor]:
    """``samples`` random batches of the recipe's input shape (normal floats; small ints)."""
    shape = _shape(recipe)
    if shape is None:
        raise InputError("the recipe's input_shape is missing or has a dimension of any size")
    dtype = getattr(torch, str(recipe.get("input_dtype") or "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"recipe.input_dtype {recipe.get('input_dtype')!r} is not a dtype")
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return [torch.randn((batch, *shape), generator=gen).to(dtype) for _ in range(samples)]
    # Integer inputs (token ids): small values every vocabulary has.
    return [
        torch.randint(0, 2, (batch, *shape), generator=gen, dtype=dtype) for _ in range(samples)
    ]


def output_delta(
    reference: nn.Module, candidate: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor]
) -> dict[str, float]:
    """Max and mean absolute difference of ``candidate``'s outputs from ``reference``'s."""
    worst, total, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for x in inputs:
            want = _as_tensor(reference(x)).float()
            got = _as_tensor(candidate(x)).float()
            if got.shape != want.shape:
                raise AimassError(f"output shape {tuple(got.shape)} != {tuple(want.shape)}")
            diff = (got - want).abs()
            finite = bool(torch.isfinite(diff).all())
            worst = max(worst, float(diff.max())) if finite else math.inf
            total += float(diff.sum())
            count += diff.numel()
    return {"max_abs": worst, "mean_abs": total / max(count, 1)}


def _as_tensor(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    return torch.as_tensor(y)


# ------------------------------------------------------------------------------ rebuilding


def build(recipe: Mapping[str, Any], state_dict: Mapping[str, Any]) -> nn.Module:
    """The module a recipe and a state dict make, on the CPU, as serving builds it."""
    from aimass_hpc.serve.model_loader import build_module, parse_recipe

    parsed = parse_recipe(recipe)
    return build_module(
        parsed.factory, parsed.kwargs, state_dict, torch.device("cpu"), parsed.pythonpath
    )


def _base_module(base: Mapping[str, Any]) -> nn.Module:
    from aimass_hpc.serve.model_loader import import_factory, parse_recipe

    parsed = parse_recipe(base, "recipe.kwargs.base")
    return import_factory(parsed.factory, parsed.pythonpath)(**parsed.kwargs)


def _wrapped_recipe(recipe: Mapping[str, Any], factory: str, **kwargs: Any) -> dict[str, Any]:
    out = {k: v for k, v in recipe.items() if k not in ("factory", "kwargs", "pythonpath")}
    out.update(factory=factory, kwargs={"base": dict(recipe), **kwargs})
    return out


# ------------------------------------------------------------------------------ dtype cast


def cast_state_dict(state_dict: Mapping[str, Any], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (a torch dtype name); other tensors kept as they are."""
    target = getattr(torch, dtype)
    return {
        k: (t.to(target) if torch.is_tensor(t) and t.is_floating_point() else t)
        for k, t in state_dict.items()
    }


def cast_model(base: Mapping[str, Any], dtype: str) -> nn.Module:
    """Recipe factory: the ``base`` recipe's module in ``dtype``; float32 in, float32 out."""
    target = getattr(torch, dtype)
    module = _base_module(base).to(target)

    def cast_in(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            a.to(target) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )

    def cast_out(_m: nn.Module, _args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        return out

    module.register_forward_pre_hook(cast_in)
    module.register_forward_hook(cast_out)
    return module


# ------------------------------------------------------------------------------ int8


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one float32 scale per output row.

    ``dynamic``: the activations are quantized too, per row (symmetric int8), as torchao's
    ``Int8DynamicActivationInt8WeightConfig`` does; else only the weights are (weight-only).
    The products are computed in the input's float dtype (exact for int8 x int8 sums of up
    to ~1000 terms in float32; no int8 kernels are needed to serve).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dynamic: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if self.dynamic:
            # torchao's symmetric int8 rule: absmax / ((127 - -128) / 2), at least eps.
            eps = torch.finfo(torch.float32).eps
            scale = (x.abs().amax(dim=-1, keepdim=True) / 127.5).clamp(min=eps)
            xq = torch.clamp(torch.round(x / scale), -128, 127)
            y = F.linear(xq, w) * scale * self.weight_scale.to(x.dtype)
        else:
            y = F.linear(x, w) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def int8_model(base: Mapping[str, Any], scheme: str = "int8") -> nn.Module:
    """Recipe factory: the ``base`` recipe's module with every ``nn.Linear`` an Int8Linear."""
    module = _base_module(base)
    dynamic = parse_scheme(scheme) == "int8"
    for name, layer in list(module.named_modules()):
        if isinstance(layer, nn.Linear):
            swap = Int8Linear(
                layer.in_features, layer.out_features, layer.bias is not None, dynamic
            )
            if not name:  # the model is a single linear layer
                return swap
            module.set_submodule(name, swap)
    return module


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao and the ONNX exporter log optional-kernel and torchvision notes: not ours."""
    loggers = [
        logging.getLogger(n) for n in ("torchao", "torch.onnx", "torch.utils._pytree", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def quantize_int8(module: nn.Module, scheme: str = "int8") -> tuple[dict[str, Any], str]:
    """Quantize ``module``'s linear layers with torchao; returns the plain-tensor state dict
    that :func:`int8_model` loads (int8 ``weight`` + ``weight_scale`` per layer) and a line
    naming the quantizer for the lineage. ``module`` is not changed."""
    config_name = QUANT_SCHEMES[parse_scheme(scheme)]
    try:
        with _quiet():
            import torchao
            from torchao import quantization
    except ImportError as exc:
        raise InputError(
            f"--quantize needs torchao ({exc}): pip install torchao (the 'export' extra)"
        ) from None
    work = copy.deepcopy(module)
    with _quiet():
        quantization.quantize_(work, getattr(quantization, config_name)())
    state = dict(module.state_dict())
    done = 0
    for name, layer in work.named_modules():
        weight: Any = getattr(layer, "weight", None)
        if isinstance(layer, nn.Linear) and hasattr(weight, "qdata") and hasattr(weight, "scale"):
            prefix = f"{name}." if name else ""
            state[f"{prefix}weight"] = weight.qdata.detach().to(torch.int8).contiguous().clone()
            state[f"{prefix}weight_scale"] = weight.scale.detach().float().reshape(-1).clone()
            done += 1
    if not done:
        raise InputError("--quantize: the model has no nn.Linear layer to quantize")
    return state, f"torchao {torchao.__version__} {config_name}"


# --------------------------------------------------------------------------- compressions


def compress(
    ckpt: Checkpoint,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    samples: int = SAMPLES,
    seed: int = SEED,
) -> Compressed:
    """Cast (``dtype``) or quantize (``quantize``) a loaded version; measure size and delta.

    The compressed state dict is rebuilt through the serving loader with its new recipe and
    compared with the original on ``samples`` random batches: a result that does not load
    never comes back.
    """
    if (dtype is None) == (quantize is None):
        raise InputError("give one of --dtype or --quantize")
    what = "--dtype" if dtype is not None else "--quantize"
    v = ckpt.version
    recipe = source_recipe(v, what)
    original = build(recipe, ckpt.state_dict)
    settings: dict[str, Any] = {"samples": samples, "batch": BATCH, "seed": seed}
    if dtype is not None:
        name = parse_dtype(dtype)
        state = cast_state_dict(ckpt.state_dict, name)
        new_recipe = _wrapped_recipe(recipe, _CAST_FACTORY, dtype=name)
        settings["dtype"] = name
    else:
        scheme = parse_scheme(str(quantize))
        state, quantizer = quantize_int8(original, scheme)
        new_recipe = _wrapped_recipe(recipe, _INT8_FACTORY, scheme=scheme)
        settings.update(quantize=scheme, quantizer=quantizer)
    try:
        rebuilt = build(new_recipe, state)
    except AimassError as exc:
        raise AimassError(f"the compressed {v.ref} does not load: {exc}") from None
    delta = output_delta(original, rebuilt, random_inputs(recipe, samples, seed=seed))
    return Compressed(
        source=v.ref,
        state_dict=state,
        recipe=new_recipe,
        settings=settings,
        size_bytes=tensor_bytes(state),
        source_size_bytes=tensor_bytes(ckpt.state_dict),
        delta=delta,
    )


def as_checkpoint(result: Compressed, source: Version) -> Checkpoint:
    """A checkpoint view of ``result`` for the file exporters (metadata carries the recipe)."""
    meta = dict(source.metadata)
    meta.update(
        recipe=result.recipe,
        parent=source.ref,
        exported_from=source.ref,
        compression=result.report(),
    )
    for key in ("tensor_bytes", "file_size", "param_count", "metrics"):
        meta.pop(key, None)
    return Checkpoint(
        dict(result.state_dict), None, None, Version(source.name, source.number, source.path, meta)
    )


def store(repo: Any, result: Compressed, source: Version, name: str | None = None) -> Version:
    """Save ``result`` as a new version of ``name`` (default: the source's model) with its
    lineage: parent, the export's settings, the measured size and accuracy delta."""
    tag = result.settings.get("dtype") or result.settings.get("quantize")
    return repo.save(
        name or source.name,
        result.state_dict,
        parent=source.ref,
        recipe=result.recipe,
        tags=[f"compressed-{tag}"],
        metrics={
            "export_max_abs_diff": result.delta["max_abs"],
            "export_mean_abs_diff": result.delta["mean_abs"],
            "size_bytes": float(result.size_bytes),
        },
        hyperparameters=source.hyperparameters,
        description=f"{tag} export of {source.ref}",
        run={"export": result.report()},
        model_type=source.model_type,
        flops_per_sample=source.flops_per_sample,
    )


# ---------------------------------------------------------------------------------- onnx


def export_onnx(
    ckpt: Checkpoint,
    target: Path,
    *,
    tolerance: float = ONNX_TOLERANCE,
    samples: int = SAMPLES,
    seed: int = SEED,
    overwrite: bool = False,
) -> OnnxReport:
    """Export the version's module to ONNX (dynamic batch axis) and publish the file only if
    onnxruntime reproduces torch's outputs within ``tolerance`` (max absolute difference) on
    ``samples`` random batches; otherwise nothing is written and the error says by how much."""
    if not tolerance >= 0:
        raise InputError(f"--tolerance must be a number >= 0, got {tolerance}")
    v = ckpt.version
    recipe = source_recipe(v, "--format onnx")
    module = build(recipe, ckpt.state_dict)
    inputs = random_inputs(recipe, samples, seed=seed)
    try:
        with _quiet():
            import onnx  # noqa: F401  (the exporter needs it; say so before exporting)
            import onnxruntime as ort
    except ImportError as exc:
        raise InputError(
            f"--format onnx needs onnx and onnxruntime ({exc}): pip install onnx onnxruntime "
            "onnxscript (the 'export' extra)"
        ) from None
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConflictError(f"{target} exists; choose another path or overwrite it explicitly")
    if not target.parent.is_dir():
        raise NotFoundError(f"directory {target.parent} does not exist")
    found: dict[str, float] = {}

    def write(tmp: Path) -> None:
        example = (inputs[0],)
        batch = torch.export.Dim("batch", min=1)
        try:
            with _quiet(), contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    module,
                    example,
                    str(tmp),
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_shapes=({0: batch},),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as exc:  # exporter and runtime raise many types; one line for the user
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AimassError(f"torch.onnx/onnxruntime could not export {v.ref}: {first}") from None
        feed = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> Any:
            return session.run(None, {feed: x.numpy()})[0]

        found.update(output_delta(module, run, inputs))
        if not found["max_abs"] <= tolerance:
            raise AimassError(
                f"onnx export of {v.ref}: onnxruntime differs from torch by max abs "
                f"{found['max_abs']:.3g} > tolerance {tolerance:g}; nothing written"
            )

    publish_file(target, write)
    return OnnxReport(
        source=v.ref,
        path=target,
        size_bytes=target.stat().st_size,
        source_size_bytes=tensor_bytes(ckpt.state_dict),
        max_abs_diff=found["max_abs"],
        mean_abs_diff=found["mean_abs"],
        tolerance=tolerance,
        samples=samples,
    )
