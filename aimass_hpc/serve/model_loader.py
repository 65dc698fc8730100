"""Turn a stored checkpoint into a module ready to serve.

A checkpoint's metadata carries a ``recipe``::

    {"factory": "package.module:function", "kwargs": {...},
     "input_shape": [3, 32, 32], "input_dtype": "float32"}

The factory is imported and called to rebuild the ``nn.Module``; the stored state dict is then
loaded into it. On CPU the module is built on the meta device and the stored tensors are
*assigned* as its parameters, so weights the repository maps from disk stay mapped instead of
being copied into freshly initialised ones.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.serve.codec import ALLOWED_DTYPES, InputSpec, shape_of


@dataclass
class ServedModel:
    """A module plus what the server needs to know to feed it."""

    name: str
    ref: str
    version: str | None
    module: nn.Module
    device: torch.device
    spec: InputSpec
    metadata: dict[str, Any] = field(default_factory=dict)
    output_shape: tuple[int, ...] | None = None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the module on a numpy batch; returns a numpy batch (inference mode)."""
        if not batch.flags.writeable:
            batch = batch.copy()  # torch.from_numpy refuses read-only (e.g. .npy body) views
        x = torch.from_numpy(batch)
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            y = self.module(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"model {self.ref} returned {type(y).__name__}, not a tensor")
        if y.dtype in (torch.bfloat16,):
            y = y.float()  # numpy has no bfloat16
        return y.detach().to("cpu").numpy()

    def warm_up(self) -> np.ndarray | None:
        """One forward on a zero sample; records the output shape (None: shape unknown)."""
        example = self.spec.example(1)
        if example is None:
            return None
        out = self.forward(example)
        self.output_shape = tuple(int(d) for d in out.shape[1:])
        return out

    def describe(self) -> dict[str, Any]:
        """The JSON description served by ``GET /v1/models``."""
        return {
            "name": self.name,
            "ref": self.ref,
            "version": self.version,
            "device": str(self.device),
            "input_shape": None
            if self.spec.shape is None
            else [d if d is not None else -1 for d in self.spec.shape],
            "input_dtype": self.spec.dtype.name,
            "output_shape": list(self.output_shape) if self.output_shape is not None else None,
            "parameters": self.parameter_count(),
        }

    def parameter_count(self) -> int:
        """Number of parameters of the module."""
        return sum(p.numel() for p in self.module.parameters())


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: a visible CUDA GPU (Slurm sets CUDA_VISIBLE_DEVICES), else CPU.

    Several tasks of one step on a node share its visible GPUs: task ``SLURM_LOCALID`` takes
    GPU ``LOCALID % count`` so that replicas do not pile onto GPU 0.
    """
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = int(os.environ.get("SLURM_LOCALID", "0") or 0)
        return torch.device(f"cuda:{local % max(torch.cuda.device_count(), 1)}")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {requested!r}: CUDA is not available on this node")
    return dev


def import_factory(path: str, pythonpath: Sequence[str] = ()) -> Callable[..., nn.Module]:
    """Import ``package.module:function`` (the recipe's ``factory``).

    ``pythonpath`` (the recipe's) is put first on ``sys.path``: where the user's code lives.
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise InputError(f"recipe.factory {path!r} must look like 'package.module:function'")
    for entry in reversed(list(pythonpath)):
        if str(entry) not in sys.path:
            sys.path.insert(0, str(entry))
    mod_name, attr = path.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise NotFoundError(f"recipe.factory {path!r}: cannot import {mod_name}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise NotFoundError(f"recipe.factory {path!r}: {mod_name} has no {attr}")
    if not callable(obj):
        raise InputError(f"recipe.factory {path!r} is not callable")
    return obj


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: how to rebuild the module and what it takes."""

    factory: str
    kwargs: dict[str, Any]
    spec: InputSpec  # shape None when the recipe does not say (inferred after the build)
    pythonpath: tuple[str, ...] = ()


def parse_recipe(recipe: Any, where: str = "recipe") -> Recipe:
    """Validate a recipe. Errors name the field; a missing ``input_shape`` is allowed."""
    if not isinstance(recipe, Mapping):
        raise InputError(f"{where} is missing or not an object; serving needs it to rebuild")
    factory = recipe.get("factory")
    if not isinstance(factory, str):
        raise InputError(f"{where}.factory is missing")
    kwargs = recipe.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise InputError(f"{where}.kwargs must be an object")
    shape = None
    if recipe.get("input_shape") is not None:
        try:
            shape = shape_of(recipe.get("input_shape"))
        except (ValueError, TypeError) as exc:
            raise InputError(f"{where}.input_shape: {exc}") from None
    dtype_name = recipe.get("input_dtype") or "float32"
    if dtype_name not in ALLOWED_DTYPES:
        raise InputError(f"{where}.input_dtype {dtype_name!r} is not a numeric dtype")
    pythonpath = recipe.get("pythonpath") or []
    if not isinstance(pythonpath, list | tuple):
        raise InputError(f"{where}.pythonpath must be a list of directories")
    return Recipe(
        factory, dict(kwargs), InputSpec(shape, np.dtype(dtype_name)), tuple(map(str, pythonpath))
    )


def infer_spec(module: nn.Module, spec: InputSpec) -> InputSpec:
    """Fill an unknown input shape from the first layer (Linear, ConvNd, Embedding)."""
    if spec.shape is not None:
        return spec
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return InputSpec((layer.in_features,), spec.dtype)
        if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(layer)]
            return InputSpec((layer.in_channels, *([None] * spatial)), spec.dtype)
        if isinstance(layer, nn.Embedding):
            return InputSpec((None,), np.dtype("int64"))
    return spec


def build_module(
    factory: str,
    kwargs: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device,
    pythonpath: Sequence[str] = (),
) -> nn.Module:
    """Rebuild the module and load ``state_dict`` into it (mapped tensors kept on CPU)."""
    make = import_factory(factory, pythonpath)
    module: nn.Module | None = None
    if device.type == "cpu":
        # Build without allocating init weights, then adopt the stored tensors as parameters.
        try:
            with torch.device("meta"):
                candidate = make(**kwargs)
            candidate.load_state_dict(dict(state_dict), strict=True, assign=True)
            if not any(t.is_meta for t in (*candidate.parameters(), *candidate.buffers())):
                module = candidate
        except (RuntimeError, NotImplementedError, TypeError):
            module = None  # a factory that cannot build on meta: fall back below
    if module is None:
        module = make(**kwargs)
        try:
            module.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(f"checkpoint does not fit {factory}: {first}") from None
        module = module.to(device)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_from_repository(
    repo_path: str | os.PathLike[str], ref: str, device: str = "auto"
) -> ServedModel:
    """Load ``ref`` (name, name:VERSION, name@ALIAS) from the model repository."""
    from aimass_hpc.repo import ModelRepository  # the repository is optional until serving
    from aimass_hpc.repo.refs import Ref

    parsed = Ref.parse(ref, "model")
    ckpt = ModelRepository(repo_path).load(parsed)
    version_obj = getattr(ckpt, "version", None)
    metadata = dict(getattr(version_obj, "metadata", None) or {})
    name = getattr(version_obj, "name", None) or parsed.name
    number = getattr(version_obj, "version", None)
    if number is None:
        number = getattr(version_obj, "number", None)
    recipe = parse_recipe(metadata.get("recipe"), where=f"model {ref} recipe")
    dev = pick_device(device)
    module = build_module(recipe.factory, recipe.kwargs, ckpt.state_dict, dev, recipe.pythonpath)
    return ServedModel(
        name=str(name),
        ref=ref,
        version=None if number is None else str(number),
        module=module,
        device=dev,
        spec=infer_spec(module, recipe.spec),
        metadata=metadata,
    )


def load_from_files(
    recipe: Mapping[str, Any],
    weights: str | os.PathLike[str] | None,
    *,
    name: str = "model",
    version: str | None = None,
    device: str = "auto",
) -> ServedModel:
    """Serve a model without a repository: a recipe plus a ``torch.save``-d state dict.

    Used by tests, the benchmark and quick local checks. Weights are loaded with
    ``weights_only=True`` and ``mmap=True`` (no pickled code runs, nothing is copied).
    """
    parsed = parse_recipe(recipe)
    dev = pick_device(device)
    if weights is None:
        make = import_factory(parsed.factory, parsed.pythonpath)
        state_dict = make(**parsed.kwargs).state_dict()
    else:
        path = Path(weights)
        if not path.is_file():
            raise NotFoundError(f"weights file {path} does not exist")
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    module = build_module(parsed.factory, parsed.kwargs, state_dict, dev, parsed.pythonpath)
    ref = name if version is None else f"{name}:{version}"
    return ServedModel(
        name=name,
        ref=ref,
        version=version,
        module=module,
        device=dev,
        spec=infer_spec(module, parsed.spec),
        metadata={"recipe": dict(recipe)},
    )
