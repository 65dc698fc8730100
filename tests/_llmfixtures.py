"""What the vLLM tests share: the vLLM environment, a dev site that uses it, the tiny Llama
and the CLI.

    from _llmfixtures import aimass, build_tiny, llm_site, require_vllm
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import site_data, write_site

from aimass_hpc.config.site import Site
from aimass_hpc.serve import tiny_llm

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"


def require_vllm() -> Path:
    """The vLLM environment's python; missing is a failure with the command that makes it."""
    if not (VLLM_VENV / ".aimass-vllm-stamp").is_file() or not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_VENV} is missing: run scripts/setup-vllm (about 2 minutes)")
    return VLLM_PYTHON


def llm_site(tmp_path: Path, **top: object) -> Site:
    """The dev site under ``tmp_path`` with its vLLM at this checkout's ``.venv-vllm``;
    ``top`` replaces other top-level tables (as :func:`write_site`)."""
    serving = site_data("dev")["serving"]
    serving["vllm"] = {**serving.get("vllm", {}), "python": str(require_vllm())}
    return write_site(tmp_path, "dev", serving=serving, **top)


def build_tiny(out: Path, seed: int | None = None) -> Path:
    """The tiny Llama (of ``seed``, else the builder's default) in ``out``, built by the vLLM
    environment's transformers."""
    if seed is None:
        argv = [tiny_llm.__file__, str(out)]
    else:
        code = "import runpy, sys; runpy.run_path(sys.argv[1])['build'](sys.argv[2], seed=int(sys.argv[3]))"  # noqa: E501
        argv = ["-c", code, tiny_llm.__file__, str(out), str(seed)]
    built = subprocess.run(
        [str(require_vllm()), *argv], capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr
    return out


def aimass(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """``aimass ARGS`` in a subprocess (wide rich tables); a failure shows its stderr."""
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True,
        timeout=timeout, env=env,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"aimass {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def tiny_in_repo(tmp_path: Path) -> Site:
    """A dev site under ``tmp_path`` (see :func:`llm_site`) whose repository holds the tiny
    Llama as ``tiny:1``."""
    site = llm_site(tmp_path)
    sf = str(site.source)
    build_tiny(tmp_path / "tiny-hf")
    aimass("models", "--site", sf, "import-hf", str(tmp_path / "tiny-hf"), "tiny")
    return site
