"""Site fixtures other tests import: a dev-cluster site (or a local one) whose runs and models
live under a pytest tmp_path, so tests never touch ~/aimass-dev.

    from _sitefixtures import dev_site, local_site, write_site   # tests/ is on sys.path

    def test_x(cluster, dev_site): ...          # a Site for the local Slurm cluster
    site = write_site(tmp_path, "dev", runs=tmp_path / "my runs", env={"X": "1"})
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from aimass_hpc.config.site import BUNDLED_SITES, Site, load_site


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # TOML basic strings share JSON's escapes for what we need.
        import json

        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """A tiny TOML writer for site configs (tables of scalars, lists and sub-tables)."""
    lines: list[str] = []

    def table(prefix: str, mapping: dict[str, Any]) -> None:
        scalars = {k: v for k, v in mapping.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in mapping.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            if value is not None:
                lines.append(f"{_key(key)} = {_toml_value(value)}")
        if scalars or prefix:
            lines.append("")
        for key, value in tables.items():
            table(f"{prefix}.{_key(key)}" if prefix else _key(key), value)

    table("", data)
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    import re

    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def site_data(base: str = "dev") -> dict[str, Any]:
    """The bundled site ``base`` as a plain mapping (to tweak and write back)."""
    return tomllib.loads((BUNDLED_SITES / f"{base}.toml").read_text(encoding="utf-8"))


def write_site(
    tmp_path: Path,
    base: str = "dev",
    *,
    runs: Path | None = None,
    models: Path | None = None,
    name: str | None = None,
    **top: Any,
) -> Site:
    """Write a copy of bundled site ``base`` with runs/models under ``tmp_path``; load it.

    ``top`` replaces top-level keys (whole tables, e.g. ``env={...}``, ``preemption={...}``).
    """
    data = site_data(base)
    data["filesystems"] = {
        **data["filesystems"],
        "runs": str(runs or tmp_path / "runs"),
        "models": str(models or tmp_path / "models"),
    }
    if name:
        data["name"] = name
    data.update(top)
    path = tmp_path / f"site-{data['name']}.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    return load_site(str(path))


@pytest.fixture
def dev_site(tmp_path: Path) -> Site:
    """The dev-cluster site with its runs/models roots under ``tmp_path``."""
    return write_site(tmp_path, "dev")


@pytest.fixture
def local_site(tmp_path: Path) -> Site:
    """The local (subprocess) site with its runs/models roots under ``tmp_path``."""
    return write_site(tmp_path, "local")
