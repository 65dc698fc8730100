"""Launch latency (issue 11): what ``aimass train`` and a training rank do before the first
step. Compiled job templates are kept on disk between processes (never trusted when the
source changed or the folder is not the user's alone), and a rank imports no pydantic, h5py or
login-side module before its first step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import write_site

from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.launch import render
from aimass_hpc.launch.render import render_request


@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    """A fresh on-disk template cache for this test, and a counter of template compiles."""
    folder = tmp_path / "cache" / "templates"
    monkeypatch.setattr(render, "_COMPILED", render._CompiledTemplates(folder))
    compiled: list[str] = []
    real = render._TemplateEnvironment._compile

    def counting(self, source, filename):  # the real compile, counted
        compiled.append(filename)
        return real(self, source, filename)

    monkeypatch.setattr(render._TemplateEnvironment, "_compile", counting)
    return folder, compiled


def _new_process_cache(monkeypatch, folder: Path) -> None:
    """What a new ``aimass`` process starts with: nothing in memory, the folder on disk."""
    monkeypatch.setattr(render, "_COMPILED", render._CompiledTemplates(folder))


def test_a_new_process_loads_compiled_templates_from_disk(tmp_path, monkeypatch, disk_cache):
    folder, compiled = disk_cache
    site = write_site(tmp_path, "dev")
    request = JobRequest(name="cached", kind="train", command=["python", "-m", "x"])
    first = render_request(site, request, "/runs/x")
    assert compiled and sorted(p.name for p in folder.iterdir())  # compiled, then stored
    assert (folder.stat().st_mode & 0o777) == 0o700
    compiled.clear()
    _new_process_cache(monkeypatch, folder)
    assert render_request(site, request, "/runs/x") == first
    assert compiled == []  # every template came from the disk cache


def test_an_edited_override_is_compiled_again_despite_the_disk_cache(
    tmp_path, monkeypatch, disk_cache
):
    folder, compiled = disk_cache
    templates = tmp_path / "templates"
    templates.mkdir()
    site = write_site(tmp_path, "dev", templates=str(templates))
    request = JobRequest(name="edit", command=["true"])
    for marker in ("first", "second"):
        (templates / "job.j2").write_text(
            f"#!/bin/bash\n# {marker}\necho {{{{ job.name|q }}}}\n", encoding="utf-8"
        )
        _new_process_cache(monkeypatch, folder)
        assert render_request(site, request, "/r") == f"#!/bin/bash\n# {marker}\necho edit\n"
    assert len(compiled) == 2  # the changed source did not match the stored checksum


def test_a_damaged_cache_file_is_compiled_again(tmp_path, monkeypatch, disk_cache):
    folder, compiled = disk_cache
    site = write_site(tmp_path, "dev")
    request = JobRequest(name="damaged", command=["true"])
    first = render_request(site, request, "/r")
    for entry in folder.iterdir():
        entry.write_bytes(entry.read_bytes()[:40])  # cut short mid-way
    compiled.clear()
    _new_process_cache(monkeypatch, folder)
    assert render_request(site, request, "/r") == first
    assert compiled  # recompiled rather than failing


def test_a_cache_folder_others_can_write_is_not_used(tmp_path, monkeypatch, disk_cache):
    folder, compiled = disk_cache
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # anyone could plant code there: neither read nor written
    site = write_site(tmp_path, "dev")
    request = JobRequest(name="shared", command=["true"])
    first = render_request(site, request, "/r")
    assert list(folder.iterdir()) == []
    compiled.clear()
    _new_process_cache(monkeypatch, folder)
    assert render_request(site, request, "/r") == first
    assert compiled  # compiled again: nothing came from the shared folder


def test_aimass_cache_dir_chooses_or_disables_the_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AIMASS_CACHE_DIR", str(tmp_path))
    chosen = render._cache_dir()
    assert chosen is not None and chosen.parent == tmp_path
    assert chosen.name.startswith("templates-jinja")
    monkeypatch.setenv("AIMASS_CACHE_DIR", "")
    assert render._cache_dir() is None


def test_a_rank_imports_no_login_side_module_before_its_first_step():
    # What `python -m aimass_hpc.runtime train` imports before Trainer.fit: none of the
    # login side's libraries, and the model repository only once a checkpoint is saved.
    code = (
        "import sys\n"
        "import aimass_hpc.runtime.api, aimass_hpc.runtime.task, aimass_hpc.runtime.trainer\n"
        "heavy = ('pydantic', 'h5py', 'rich', 'jinja2', 'click')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "             or m.startswith(('aimass_hpc.config', 'aimass_hpc.launch',\n"
        "                              'aimass_hpc.repo.metadata'))))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"
