"""A real wheel: built from this checkout, installed (not editable) into a fresh venv, it works.

The wheel must carry ``job_templates/`` and ``site_configs/`` (top-level folders in the checkout,
mapped in as ``aimass_hpc/job_templates`` and ``aimass_hpc/site_configs``) and the installed
package must find them there, not in the checkout. Nothing is downloaded: the wheel is built with
the dev venv's setuptools (``--no-build-isolation``) and the fresh venv reaches the dev venv's
dependencies through a ``.pth`` path entry. A path entry does not process the ``.pth`` files of
the directory it adds, so the dev venv's editable finder for aimass_hpc stays inactive; the test
asserts that ``aimass_hpc`` resolves to the fresh venv's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml names the README, the packages and the two data folders.
SOURCES = [
    "pyproject.toml",
    "README.md",
    "MANIFEST.in",
    "aimass_hpc",
    "job_templates",
    "site_configs",
]
DATA_PACKAGES = {
    "aimass_hpc.job_templates": "job_templates",
    "aimass_hpc.site_configs": "site_configs",
}
# Appended to the copy's job.j2 only: a rendered script carrying it came from the wheel.
MARKER = "# aimass wheel test: rendered from the installed job_templates"


def test_pyproject_lists_every_package():
    """``packages`` is listed by hand in pyproject.toml (see there why): it must stay complete."""
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "aimass_hpc").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    listed = set(setuptools_cfg["packages"])
    # Folders of data inside the package (no __init__.py), named in package-data.
    data_only = {
        name
        for name in setuptools_cfg["package-data"]
        if name not in DATA_PACKAGES
        and not (ROOT / name.replace(".", "/") / "__init__.py").exists()
        and (ROOT / name.replace(".", "/")).is_dir()
    }
    listed -= data_only
    assert listed - set(DATA_PACKAGES) == found, (
        "pyproject.toml [tool.setuptools] packages differs from the checkout: "
        f"missing {sorted(found - listed)}, stale {sorted(listed - found - set(DATA_PACKAGES))}"
    )
    assert setuptools_cfg["package-dir"] == DATA_PACKAGES


@dataclass
class Fresh:
    """A fresh venv with the wheel installed, and where to run it from."""

    python: Path
    aimass: Path
    site_packages: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(a) for a in args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (
            f"{args} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
        return proc


def _clean_env() -> dict[str, str]:
    """This environment without what points into the checkout or the dev venv.

    conftest.py puts the checkout on PYTHONPATH, which would hide the installed copy (pip would
    even call the wheel "already satisfied"); $AIMASS_SITE would bypass the bundled sites.
    """
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "AIMASS_SITE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _check(cmd: list[str | Path]) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, env=_clean_env()
    )
    assert proc.returncode == 0, (
        f"{cmd} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Fresh:
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build writes build/ and *.egg-info into the checkout, which
    # concurrent runs would share and where stale files from removed modules would linger.
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    with (src / "job_templates" / "job.j2").open("a", encoding="utf-8") as f:
        f.write(f"\n{MARKER}\n")

    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    _check(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src]
    )
    (wheel,) = dist.glob("aimass_hpc-*.whl")

    venv = tmp / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # The dev venv's pip installs into the fresh venv (--python): no ensurepip, nothing fetched.
    _check([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    site_packages = Path(
        _check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    )
    dev_paths = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site_packages / "aimass_dev_deps.pth").write_text(
        "".join(f"{p}\n" for p in dev_paths), encoding="utf-8"
    )

    # An empty HOME, so that ~/.config/aimass/sites cannot shadow the bundled sites.
    env = _clean_env()
    home = tmp / "home"
    home.mkdir()
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    cwd = tmp / "cwd"
    cwd.mkdir()
    return Fresh(python, venv / "bin" / "aimass", site_packages, cwd, env)


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_wheel_carries_the_data_folders(fresh: Fresh):
    installed = fresh.site_packages / "aimass_hpc"
    for name in ("job.j2", "train.j2", "trial.j2", "serve.j2", "_header.j2", "README.md"):
        assert (installed / "job_templates" / name).is_file(), name
    for name in ("dev.toml", "local.toml", "example-hpc.toml", "README.md"):
        assert (installed / "site_configs" / name).is_file(), name
    for name in ("templates/jobs.html", "templates/models.html", "static/dashboard.js"):
        assert (installed / "dashboard" / name).is_file(), name
    # Data only: the checkout folders do not become top-level packages of site-packages.
    assert not (fresh.site_packages / "job_templates").exists()
    assert not (fresh.site_packages / "site_configs").exists()


def test_installed_package_is_the_wheel_not_the_checkout(fresh: Fresh):
    out = fresh.run(
        fresh.python,
        "-c",
        "import json, aimass_hpc, jinja2, aimass_hpc.config.site as s;"
        " print(json.dumps([aimass_hpc.__file__, str(s.BUNDLED_TEMPLATES),"
        " str(s.BUNDLED_SITES), jinja2.__file__]))",
    ).stdout
    package, templates, sites, jinja = json.loads(out)
    assert _inside(package, fresh.site_packages), package
    assert Path(templates).resolve() == (fresh.site_packages / "aimass_hpc/job_templates").resolve()
    assert Path(sites).resolve() == (fresh.site_packages / "aimass_hpc/site_configs").resolve()
    # The dependencies come from the dev venv through the .pth path entry.
    assert not _inside(jinja, fresh.site_packages), jinja


def test_site_list_and_check_use_the_bundled_sites(fresh: Fresh):
    sites = fresh.site_packages / "aimass_hpc" / "site_configs"
    listed = json.loads(fresh.run(fresh.aimass, "site", "list", "--json").stdout)
    by_name = {s["name"]: s for s in listed}
    assert {"dev", "local", "example-hpc"} <= set(by_name)
    for name in ("dev", "local", "example-hpc"):
        assert by_name[name]["valid"], by_name[name]
        assert _inside(by_name[name]["path"], sites), by_name[name]
    fresh.run(fresh.aimass, "site", "list")

    out = fresh.run(fresh.aimass, "site", "check", "dev").stdout
    assert f"{sites.resolve() / 'dev.toml'}: ok" in out, out


def test_dry_run_renders_from_the_installed_templates(fresh: Fresh):
    spec = fresh.cwd / "hello.toml"
    spec.write_text(
        '[job]\nname = "wheelcheck"\ncommand = ["echo", "hello from the wheel"]\n', encoding="utf-8"
    )
    script = fresh.run(fresh.aimass, "submit", spec, "--site", "local", "--dry-run").stdout
    assert "#SBATCH --job-name=wheelcheck" in script
    assert MARKER in script, "the script was not rendered from the wheel's job_templates"
    local = fresh.site_packages / "aimass_hpc" / "site_configs" / "local.toml"
    assert f"export AIMASS_SITE={local.resolve()}" in script, script
    assert list(fresh.cwd.iterdir()) == [spec], "--dry-run wrote something"
