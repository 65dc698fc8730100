"""``aimass search list``: find searches by name under a site's runs root (issue 12, item 10).

Real search directories and journals (create_search + journal records as a driver writes
them), the real CLI in a subprocess; no scheduler is needed to list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _sitefixtures import write_site

from aimass_hpc.config.search_spec import load_search_spec
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.search_driver import create_search
from aimass_hpc.launch.search_launch import list_searches


def _spec(tmp: Path, name: str, budget: int = 3) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[search]
name = "{name}"
budget = {budget}
direction = "maximize"
[objective]
command = ["true", "{{x}}"]
[space]
x = {{type = "float", low = 0.0, high = 1.0}}
"""
    )
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "search", "list", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )


def _finish(sdir, values: list[float], *, promoted: str | None = None) -> None:
    journal = sdir.journal()
    for i, value in enumerate(values):
        journal.append(J.TRIAL_PROPOSED, trial=i, params={"x": value})
        journal.append(J.TRIAL_FINISHED, trial=i, value=value)
    if promoted:
        journal.append(J.MODEL_PROMOTED, trial=0, ref="m:1", model="m", version=1, alias=promoted)
    journal.append(J.SEARCH_FINISHED, best={"trial": 0}, cancelled=False, counts={})


def test_search_list_finds_searches_by_name(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    root = site.runs_root / "searches"
    done = create_search(load_search_spec(_spec(tmp_path, "lr-sweep")), site)
    _finish(done, [0.2, 0.7, 0.5], promoted="best-lr-sweep")
    stopped = create_search(load_search_spec(_spec(tmp_path, "lr-fine", budget=5)), site)
    stopped.journal().append(J.TRIAL_PROPOSED, trial=0, params={"x": 0.1})
    other = create_search(load_search_spec(_spec(tmp_path, "depth")), site)
    other.journal().append(J.CANCEL_REQUESTED, host="h")
    other.journal().append(J.SEARCH_FINISHED, best=None, cancelled=True, counts={})
    (root / "not-a-search").mkdir()  # no journal: not listed
    broken = root / "20260101-000000-broken-abcdef"
    broken.mkdir()
    (broken / J.JOURNAL_NAME).write_text('{"type": "nonsense", "seq": 0}\n')

    rows = {s.name: s for s in list_searches(site)}
    assert set(rows) == {"lr-sweep", "lr-fine", "depth", broken.name}
    assert rows["lr-sweep"].state == "finished" and rows["lr-sweep"].done == 3
    assert rows["lr-sweep"].best_value == 0.7 and rows["lr-sweep"].best_trial == 1
    assert rows["lr-sweep"].best_ref == "m@best-lr-sweep"
    fine = rows["lr-fine"]
    assert fine.state == "stopped" and (fine.done, fine.budget) == (0, 5)
    assert rows["depth"].state == "cancelled"
    assert rows[broken.name].state == "damaged" and "nonsense" in rows[broken.name].note

    out = _cli("lr-*", "--site", str(site.source), "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [s["name"] for s in listed] == ["lr-sweep", "lr-fine"]  # oldest first
    assert listed[0]["search_dir"] == str(done.path) and listed[0]["trials_done"] == 3
    assert listed[0]["best_ref"] == "m@best-lr-sweep"

    table = _cli("--site", str(site.source))
    assert table.returncode == 0, table.stderr
    for text in ("lr-sweep", "lr-fine", "depth", "m@best-lr-sweep", "3/3", "0/5", done.path.name):
        assert text in table.stdout, table.stdout


def test_search_list_with_no_searches(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    assert list_searches(site) == []
    out = _cli("--site", str(site.source), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    out = _cli("--site", str(site.source))
    assert out.returncode == 0 and "no search found" in out.stderr
