"""Hugging Face model directories in the repository (what ``--engine vllm`` serves).

:func:`import_hf` stores the files of a HF directory -- ``config.json``, the tokenizer files and
the ``*.safetensors`` weights -- as one new version of kind ``"hf"``: every file byte-exact as
a ``uint8`` array in the version's ``extra`` section (the HDF5 file's own per-array checksums
cover them), and in the version's ``recipe`` the file list with sizes and SHA-256 sums plus
what serving and ``aimass models show`` want to know (architectures, model_type, parameter
count, vocabulary size, context length). :func:`materialize` writes a version back into a
directory, atomically (a temp directory renamed into place), checking every file's sum.

Nothing here imports torch or transformers: the parameter count comes from the safetensors
headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from aimass_hpc.common.errors import InputError, IntegrityError
from aimass_hpc.common.fsutil import atomic_write_json, fsync_dir, read_json
from aimass_hpc.repo.records import Version
from aimass_hpc.repo.repository import ModelRepository

KIND = "hf"
RECIPE_KIND = "hf-causal-lm"
# Files of a HF directory worth storing (top level only); everything else is left out.
_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_STAMP = ".aimass-hf.json"  # in a materialized directory: which version it holds
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _hint() -> str:
    return "a Hugging Face model directory holds config.json, tokenizer files, *.safetensors"


def hf_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files of ``directory`` to store; ``InputError`` naming the first one missing."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise InputError(f"{d}: not a directory ({_hint()})")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES))
    names = {p.name for p in files}
    if "config.json" not in names:
        raise InputError(f"{d}: missing config.json ({_hint()})")
    if not any(n.endswith(".safetensors") for n in names):
        raise InputError(f"{d}: missing model.safetensors (no *.safetensors weights; {_hint()})")
    if not names.intersection(_TOKENIZER_FILES):
        raise InputError(f"{d}: missing tokenizer.json (no tokenizer files; {_hint()})")
    return files


def safetensors_parameters(path: Path) -> int:
    """Number of parameters in one ``.safetensors`` file (from its JSON header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise InputError(f"{path}: not a safetensors file (bad JSON header)") from None
    total = 0
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict):
            total += int(np.prod(entry.get("shape") or [1]))
    return total


def describe(directory: str | os.PathLike[str], files: list[Path]) -> dict[str, Any]:
    """The recipe of a HF directory: config facts, parameter count, files with sums."""
    d = Path(directory)
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{d / 'config.json'}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{d / 'config.json'}: must hold a JSON object")
    # Multimodal configs keep the language model's numbers under text_config.
    sub = config.get("text_config")
    text: dict[str, Any] = sub if isinstance(sub, dict) else config
    context = next((text[k] for k in _CONTEXT_KEYS if isinstance(text.get(k), int)), None)
    listed = []
    for p in files:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        listed.append({"name": p.name, "size": p.stat().st_size, "sha256": digest.hexdigest()})
    return {
        "kind": RECIPE_KIND,
        "architectures": list(config.get("architectures") or []),
        "model_type": config.get("model_type"),
        "parameters": sum(safetensors_parameters(p) for p in files if p.suffix == ".safetensors"),
        "vocab_size": text.get("vocab_size"),
        "context_length": context,
        "torch_dtype": config.get("torch_dtype") or config.get("dtype"),
        "files": listed,
    }


def import_hf(
    repo: ModelRepository | str | os.PathLike[str],
    directory: str | os.PathLike[str],
    name: str,
    *,
    tags: list[str] | None = None,
    description: str | None = None,
) -> Version:
    """Store the HF directory ``directory`` as a new version of ``name`` (kind ``hf``)."""
    repository = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    files = hf_files(directory)
    recipe = describe(directory, files)
    blobs = {p.name: np.fromfile(p, dtype=np.uint8) for p in files}
    return repository.save(
        name,
        None,
        extra={"hf_files": blobs},
        tags=tags,
        recipe=recipe,
        description=description or f"Hugging Face model imported from {Path(directory).name}",
        model_type="language-model",
        kind=KIND,
        param_count=recipe["parameters"],
    )


def is_hf(version: Version) -> bool:
    """Is ``version`` a Hugging Face directory stored by :func:`import_hf`?"""
    recipe = version.recipe
    return version.kind == KIND and isinstance(recipe, dict) and recipe.get("kind") == RECIPE_KIND


def check_hf(version: Version) -> dict[str, Any]:
    """The recipe of an ``hf`` version; ``InputError`` naming the ref otherwise."""
    if not is_hf(version):
        raise InputError(
            f"model {version.ref} is not a Hugging Face model (kind {version.kind}); "
            "store one with: aimass models import-hf DIR NAME"
        )
    return dict(version.recipe)


def materialize(
    repo: ModelRepository | str | os.PathLike[str],
    ref: str,
    dest: str | os.PathLike[str],
) -> Path:
    """Write the files of ``ref`` into the directory ``dest`` (atomically) and return it.

    A ``dest`` that already holds this very version (its stamp says so) is reused as is.
    Every file's SHA-256 is checked against the recipe (``IntegrityError`` naming the file).
    """
    repository = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    version = repository.get(ref)
    recipe = check_hf(version)
    out = Path(dest).expanduser().absolute()
    stamp = {"ref": version.ref, "created": version.created}
    with contextlib.suppress(OSError, ValueError):
        if read_json(out / _STAMP) == stamp:
            return out
    files = repository.load(version.ref).extra["hf_files"]
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for entry in recipe["files"]:
            data = np.asarray(files[entry["name"]], dtype=np.uint8).tobytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise IntegrityError(f"model {version.ref}: file {entry['name']} fails its sum")
            with open(tmp / entry["name"], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / _STAMP, stamp)
        fsync_dir(tmp)
        if out.exists():  # another version (or a half-written leftover): replace it
            shutil.rmtree(out)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
