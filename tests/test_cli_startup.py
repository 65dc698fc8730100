"""CLI start-up stays light: which modules a command imports, and template compiles reused
without serving stale templates. No timings are asserted (see benchmarks/bench_train.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _sitefixtures import write_site

from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.launch import render
from aimass_hpc.launch.render import render_request

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a fresh interpreter and reports what it imported (the test process itself
# has long imported everything).
_PROBE = """
import json, sys
from aimass_hpc.cli import main
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""

# Never needed to print help, the version, or a dry run's script.
JOB_SIDE = {"torch", "numpy", "h5py", "sklearn", "matplotlib"}


def _imported(tmp_path: Path, *argv: str) -> set[str]:
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    result = json.loads(out.read_text())
    assert result["code"] == 0, proc.stderr
    return {name.partition(".")[0] for name in result["modules"]}


def test_version_and_train_help_import_only_click(tmp_path):
    for argv in (["--version"], ["train", "--help"]):
        top = _imported(tmp_path, *argv)
        assert not top & (JOB_SIDE | {"pydantic", "jinja2", "rich"}), argv


def test_train_dry_run_imports_nothing_of_the_job_side(tmp_path):
    site = write_site(tmp_path, "dev")
    spec = ROOT / "examples" / "digits" / "spec.toml"
    top = _imported(tmp_path, "train", str(spec), "--site", str(site.source), "--dry-run")
    assert "jinja2" in top and "pydantic" in top  # it did render
    assert not top & (JOB_SIDE | {"rich"})


def _override_site(tmp_path: Path, marker: str):
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "job.j2").write_text(
        f"#!/bin/bash\n# {marker}\necho {{{{ job.name|q }}}}\n", encoding="utf-8"
    )
    return write_site(tmp_path, "dev", templates=str(templates))


def test_rendering_again_reuses_the_compiled_template(tmp_path):
    site = write_site(tmp_path, "dev")
    request = JobRequest(name="again", command=["true"])
    render._COMPILED.clear()
    first = render_request(site, request, "/runs/x")
    cached = dict(render._COMPILED._code)
    assert cached  # job.j2 was compiled once and kept
    assert render_request(site, request, "/runs/x") == first
    assert render._COMPILED._code == cached  # nothing compiled anew


def test_an_edited_override_template_is_seen_at_once(tmp_path):
    request = JobRequest(name="edit", command=["true"])
    site = _override_site(tmp_path, "first")
    assert render_request(site, request, "/runs/x") == "#!/bin/bash\n# first\necho edit\n"
    site = _override_site(tmp_path, "second")  # same file, same size, rewritten at once
    assert render_request(site, request, "/runs/x") == "#!/bin/bash\n# second\necho edit\n"


def test_an_override_added_later_replaces_the_bundled_template(tmp_path):
    request = JobRequest(name="late", command=["true"])
    templates = tmp_path / "templates"
    templates.mkdir()
    site = write_site(tmp_path, "dev", templates=str(templates))
    assert "#SBATCH" in render_request(site, request, "/runs/x")  # the bundled job.j2
    (templates / "job.j2").write_text("#!/bin/bash\necho late\n", encoding="utf-8")
    assert render_request(site, request, "/runs/x") == "#!/bin/bash\necho late\n"
