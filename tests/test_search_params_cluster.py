"""On the real local Slurm cluster: search parameters reach a user's script as argv
(``{placeholders}`` in ``[script] args``), an unknown placeholder is refused at --dry-run, and
two searches over the same model keep their own best aliases (issue 12, items 3 and 10).

The script is written by the test: it records its argv in its run directory and reports the
``--x`` it was given as its value through the runtime API (``job.finish``), which also saves a
tiny final model, so the driver has a model to alias.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import write_site

from aimass_hpc.launch import journal as J

pytestmark = pytest.mark.cluster

# A categorical value that would break a script that did not quote it.
HOSTILE = 'it\'s "$(touch PWNED)"; `touch PWNED2` & x={x} \\'

SCRIPT = """\
import json, os, sys
from pathlib import Path

import torch
from aimass_hpc import runtime

job = runtime.init()
Path(os.environ["AIMASS_RUN_DIR"], "argv.json").write_text(json.dumps(sys.argv[1:]))
x = float(sys.argv[1].removeprefix("--x="))
job.finish(torch.nn.Linear(2, 1), metrics={"value": x})
"""

TRAIN = """\
name = "argv-trial"
[script]
path = "trial.py"
args = ["--x={x}", "{tag}", "--trial={trial_id}", "{{braces}}"]
[model]
name = "shared-model"
[job]
nodes = 1
tasks_per_node = 1
cpus_per_task = 1
time = "00:03:00"
"""


def _search_toml(name: str, choices: list[str]) -> str:
    return f"""
[search]
name = "{name}"
sampler = "random"
seed = 11
direction = "minimize"
metric = "value"
budget = 2
parallel = 2
poll_interval = 0.5

[objective]
train = "train.toml"

[space]
x = {{type = "float", low = 0.0, high = 1.0}}
tag = {{type = "categorical", choices = {json.dumps(choices)}}}
"""


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip


def test_unknown_placeholder_is_refused_at_dry_run(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    (tmp_path / "trial.py").write_text(SCRIPT)
    (tmp_path / "train.toml").write_text(TRAIN.replace("{tag}", "--tag={tagg}"))
    spec = tmp_path / "search.toml"
    spec.write_text(_search_toml("typo", ["a", "b"]))
    out = _cli("search", str(spec), "--site", str(site.source), "--dry-run")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "objective.train: train.toml: script.args[1]: placeholder {tagg}" in lines[0]
    assert "did you mean {tag}?" in lines[0]
    assert not (site.runs_root / "searches").exists()  # nothing created, nothing queued


def test_placeholders_reach_argv_and_each_search_keeps_its_best(cluster, tmp_path: Path) -> None:
    from aimass_hpc.repo import ModelRepository

    site = write_site(tmp_path, "dev")
    (tmp_path / "trial.py").write_text(SCRIPT)
    (tmp_path / "train.toml").write_text(TRAIN)
    specs = {}
    for name, choices in (("alpha", [HOSTILE]), ("beta", ["plain", "also plain"])):
        specs[name] = tmp_path / f"{name}.toml"
        specs[name].write_text(_search_toml(name, choices))
    # Both searches at once, over the same model name.
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aimass_hpc",
                "search",
                str(path),
                "--site",
                str(site.source),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, path in specs.items()
    }
    summaries = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, stderr[-3000:]
        summaries[name] = json.loads(stdout)

    repo = ModelRepository(site.models_root)
    aliases = repo.aliases("shared-model")
    for name, summary in summaries.items():
        assert summary["counts"] == {J.FINISHED: 2}, summary["trials"]
        for trial in summary["trials"]:
            argv = json.loads((Path(trial["run_dir"]) / "argv.json").read_text())
            p = trial["params"]
            # one argv word per argument, the float spelled to read back exactly
            assert argv == [f"--x={p['x']!r}", p["tag"], f"--trial={trial['id']}", "{braces}"]
            assert float(argv[0].removeprefix("--x=")) == p["x"] == trial["value"]
        best = summary["best"]
        assert summary["promoted"]["alias"] == f"best-{name}"
        version = repo.get(f"shared-model@best-{name}")
        assert version.run["run_dir"] == best["run_dir"]
        assert version.metrics["value"] == pytest.approx(best["value"])
    assert aliases["best-alpha"] != aliases["best-beta"]
    # the plain alias belongs to whichever search set it first, and the other left it alone
    assert aliases["best"] in (aliases["best-alpha"], aliases["best-beta"])
    assert HOSTILE in {t["params"]["tag"] for t in summaries["alpha"]["trials"]}
    assert not list(tmp_path.rglob("PWNED*"))  # the hostile value ran nothing

    # aimass search list finds both, filters by a name glob
    out = _cli("search", "list", "--site", str(site.source), "--json")
    assert out.returncode == 0, out.stderr
    listed = {s["name"]: s for s in json.loads(out.stdout)}
    assert set(listed) == {"alpha", "beta"}
    for name, summary in summaries.items():
        row = listed[name]
        assert row["state"] == "finished" and row["trials_done"] == 2 and row["budget"] == 2
        assert row["best_ref"] == f"shared-model@best-{name}"
        assert row["best_value"] == pytest.approx(summary["best"]["value"])
        assert row["search_dir"] == summary["search_dir"]
    out = _cli("search", "list", "al*", "--site", str(site.source), "--json")
    assert [s["name"] for s in json.loads(out.stdout)] == ["alpha"]
    table = _cli("search", "list", "--site", str(site.source))
    assert table.returncode == 0 and "best-alpha" in table.stdout and "best-beta" in table.stdout
