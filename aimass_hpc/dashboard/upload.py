"""Model upload on the Models page: ``POST /api/models/upload`` imports a torch ``.pt`` state
dict or a ``.safetensors`` file as a new version, as ``aimass models import`` does.

The file is the raw request body (no multipart parser is installed); its name, the model name
and the metadata are query parameters. The body is streamed to a private temporary file and
refused past ``MAX_UPLOAD_BYTES``; torch files are read with ``weights_only`` (no pickled code
runs; see :func:`aimass_hpc.repo.portable.read`).
"""

# No "from __future__ import annotations" (FastAPI resolves the Annotated aliases).
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from aimass_hpc.common.errors import AimassError, InputError
from aimass_hpc.repo.metadata import MODEL_TYPES

if TYPE_CHECKING:
    from aimass_hpc.dashboard.app import Ctx

MAX_UPLOAD_BYTES = 2 * 1024**3  # 2 GiB; larger models: `aimass models import` on the login node
SUFFIXES = (".pt", ".pth", ".safetensors")
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def import_stats(recipe: Any, state_dict: Any) -> dict[str, Any]:
    """FLOPs/memory/type of an imported model with a recipe; {} when it cannot be built
    (the import must still succeed, as with ``aimass models import``)."""
    from aimass_hpc.runtime.model_stats import stats_from_recipe

    try:
        return stats_from_recipe(recipe, state_dict)
    except Exception:
        declared = recipe.get("model_type") if isinstance(recipe, dict) else None
        return {"model_type": declared} if declared in MODEL_TYPES else {}


def parse_metrics(items: list[str]) -> dict[str, float]:
    """``["acc=0.9"]`` -> ``{"acc": 0.9}``; InputError naming the bad item."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise InputError(f"metric: expected NAME=NUMBER (got {item!r})")
        out[key.strip()] = number
    return out


def add_routes(app: FastAPI, ctx: "Ctx") -> None:
    """Add ``POST /api/models/upload`` to ``app``."""
    Writer = ctx.writer

    @app.post(
        "/api/models/upload",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )  # fmt: skip
    async def upload_model(
        request: Request,
        _: Writer,  # type: ignore[valid-type]
        name: Annotated[str, Query(pattern=NAME)],
        filename: Annotated[str, Query(min_length=1, max_length=255)],
        tag: Annotated[list[str] | None, Query(max_length=20)] = None,
        metric: Annotated[list[str] | None, Query(max_length=20)] = None,
        type: Annotated[str, Query(max_length=40)] = "",  # noqa: A002 - the form's field
        description: Annotated[str, Query(max_length=2000)] = "",
    ) -> dict[str, Any]:
        """Import the body (a torch .pt state dict or a .safetensors file, at most 2 GiB) as
        a new version of ``name``; ``filename`` tells the format."""
        suffix = Path(filename).suffix.lower()
        if suffix not in SUFFIXES:
            raise InputError(f"filename {filename!r}: expected a {', '.join(SUFFIXES)} file")
        if type and type not in MODEL_TYPES:
            raise InputError(f"type: expected one of {', '.join(MODEL_TYPES)} (got {type!r})")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"file too large: at most {MAX_UPLOAD_BYTES >> 20} MiB")
        kwargs: dict[str, Any] = {}
        if tag:
            kwargs["tags"] = [t for t in tag if t]
        if metric:
            kwargs["metrics"] = parse_metrics([m for m in metric if m])
        if type:
            kwargs["model_type"] = type
        if description:
            kwargs["description"] = description
        fd, tmp = tempfile.mkstemp(prefix="aimass-upload-", suffix=suffix)
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise HTTPException(
                            413, f"file too large: at most {MAX_UPLOAD_BYTES >> 20} MiB"
                        )
                    fh.write(chunk)
            if size == 0:
                raise InputError(f"{filename}: the upload is empty")
            kwargs["run"] = {"imported_from": f"dashboard upload {filename}"}
            try:
                version = await run_in_threadpool(
                    ctx.repo.import_, tmp, name, stats=import_stats, **kwargs
                )
            except AimassError as exc:  # name the user's file, not the temporary one
                raise exc.__class__(str(exc).replace(tmp, filename)) from None
            except Exception as exc:  # torch/safetensors refusing the bytes: the user's file
                first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
                raise InputError(
                    f"{filename}: not a readable torch state dict or safetensors file ({first})"
                ) from None
        finally:
            os.unlink(tmp)
        return {"ref": version.ref, "name": version.name, "version": version.number,
                "bytes": size, "filename": filename}  # fmt: skip
