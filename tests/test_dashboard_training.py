"""The dashboard's Training API over a real uvicorn server and a real httpx client.

Login required, 4xx on bad run selections, another user's runs refused, only runs with
metrics listed, curves of several runs overlaid (a long run thinned), and a real
``aimass train`` job on the local Slurm cluster.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _sitefixtures import write_site
from test_dashboard_api import logged_in, make_run, running

from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.training import MAX_POINTS, MAX_RUNS
from aimass_hpc.launch.scheduler import get_scheduler

ROOT = Path(__file__).resolve().parents[1]


def write_metrics(run_dir: Path, steps: int, scale: float = 1.0) -> None:
    lines = [json.dumps({"kind": "event", "event": "start", "total_steps": steps})]
    lines += [json.dumps({"kind": "step", "step": s, "loss": scale / s, "samples_per_s": 100.0 + s,
                          "lr": 0.1}) for s in range(1, steps + 1)]  # fmt: skip
    lines.append(json.dumps({"kind": "epoch", "step": steps, "epoch": 1, "val_acc": 0.9}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = write_site(tmp_path, "local")
    write_metrics(make_run(site.runs_root, "train-a", "201").path, 30)
    write_metrics(make_run(site.runs_root, "train-b", "202").path, 5000, scale=2.0)
    make_run(site.runs_root, "plain-job", "203")  # no metrics: not a training run
    return site


def test_training_needs_a_login(site: Site) -> None:
    with running(site) as srv, httpx.Client(base_url=srv.url, trust_env=False) as anon:
        assert anon.get("api/training").status_code == 401
        assert anon.get("api/training/curves", params={"runs": "201"}).status_code == 401
        resp = anon.get("training", params={"runs": "201"})
        assert resp.status_code == 303 and resp.headers["location"].endswith("/login")


def test_runs_with_metrics_are_listed_and_overlaid(site: Site) -> None:
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            page = client.get("training", params={"runs": "201,202"})
            assert page.status_code == 200 and 'data-page="training"' in page.text
            assert "static/vendor/chart.min.js" in page.text and "<script>" not in page.text
            listing = client.get("api/training").json()
            assert listing["total"] == 2
            rows = {r["job_id"]: r for r in listing["rows"]}
            assert set(rows) == {"201", "202"}  # 203 logged no metrics
            assert rows["201"]["step"] == 30 and rows["201"]["total_steps"] == 30
            assert rows["201"]["loss"] == pytest.approx(1 / 30)
            assert rows["201"]["metrics"]["val_acc"] == 0.9 and rows["201"]["state"] == "COMPLETED"
            assert client.get("api/training", params={"q": "train-b"}).json()["total"] == 1

            curves = client.get("api/training/curves", params={"runs": "202, 201,202"}).json()
            assert [r["job_id"] for r in curves["runs"]] == ["202", "201"]
            long, short = curves["runs"]
            assert set(short["step"]) == {"loss", "samples_per_s", "lr"}
            assert short["step"]["loss"][0] == [1, 1.0] and len(short["step"]["loss"]) == 30
            assert short["epoch"] == {"val_acc": [[30, 0.9]]}
            thinned = long["step"]["loss"]
            assert len(thinned) <= MAX_POINTS + 1 and thinned[-1] == [5000, 2.0 / 5000]


def test_bad_selections_are_4xx(site: Site) -> None:
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            for runs, code, word in (
                ("", 400, "name at least one job id"),
                ("201,rm -rf", 400, "expected job ids"),
                ("201;202", 400, "expected job ids"),
                (",".join(str(300 + i) for i in range(MAX_RUNS + 1)), 400, f"at most {MAX_RUNS}"),
                ("999", 404, "no such job"),
                ("x" * 1001, 422, ""),
            ):
                resp = client.get("api/training/curves", params={"runs": runs})
                assert resp.status_code == code, (runs, resp.text)
                assert word in str(resp.json()["detail"])
            assert client.get("api/training", params={"page": 0}).status_code == 422


def test_another_users_runs_are_refused(site: Site) -> None:
    with running(site, viewer="somebody-else") as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            assert client.get("api/training").json()["total"] == 0
            resp = client.get("api/training/curves", params={"runs": "201"})
            assert resp.status_code == 404 and "somebody-else" in resp.json()["detail"]


@pytest.mark.cluster
def test_a_real_training_job_on_the_cluster(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec = tmp_path / "digits.toml"
    spec.write_text(f"""
name = "dash-train"
pythonpath = {json.dumps([str(ROOT / "examples" / "digits")])}
[task]
ref = "digits_mlp:build"
[train]
optimizer = "sgd"
lr = 0.1
batch_size = 64
epochs = 1
seed = 7
[model]
name = "dash-train"
[job]
nodes = 1
tasks_per_node = 1
cpus_per_task = 1
time = "00:05:00"
""")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "train", str(spec), "--site", str(site.source),
         "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["job_id"]
    get_scheduler(site).wait([job_id], timeout=300, poll=2.0)
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            deadline = time.monotonic() + 60
            while True:
                rows = client.get("api/training").json()["rows"]
                if rows and rows[0]["state"] == "COMPLETED":
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(1)
            (row,) = rows
            assert row["job_id"] == job_id and row["name"] == "dash-train"
            assert row["step"] > 0 and row["loss"] > 0
            run = client.get("api/training/curves", params={"runs": job_id}).json()["runs"][0]
            steps = [p[0] for p in run["step"]["loss"]]
            assert steps == sorted(steps) and len(steps) == row["step"]
            assert "samples_per_s" in run["step"]
