"""The dashboard's Services API over a real uvicorn server (tests/test_dashboard_api.py's
helpers): login and CSRF on every endpoint, 4xx on bad input, another user's service refused,
latency percentiles from a real replica's Prometheus text, and -- on the real local Slurm
cluster -- a real service started, measured, load-tested, upgraded to a version, rolled back
and stopped through the API, as `aimass serve`/`aimass bench` would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from _sitefixtures import write_site
from test_dashboard_api import logged_in, running

from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.auth import CSRF_HEADER
from aimass_hpc.dashboard.services import parse_metrics, quantile
from aimass_hpc.launch.runs import RunDir
from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve import toymodels
from aimass_hpc.serve.auth import ensure_token, token_path
from aimass_hpc.serve.bench import parse_shape
from aimass_hpc.serve.endpoints import EndpointRecord, EndpointState, read_records, write_record
from aimass_hpc.serve.metrics import ServeMetrics

KWARGS = {"in_features": 6, "hidden": 16, "out_features": 3}


def save_toys(site: Site) -> ModelRepository:
    """toy:1 and toy:2 (servable: a recipe), toy@prod -> 1."""
    repo = ModelRepository(site.models_root)
    for seed in (1, 2):
        torch.manual_seed(seed)
        repo.save("toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS))
    repo.promote("toy", 1, "prod")
    return repo


def fake_service(site: Site) -> Path:
    """A service's run directory as `aimass serve` leaves it once its replica stopped (no job:
    ownership and input checks need no running replica)."""
    run = RunDir.create(site.runs_root, "serve-toy")
    ensure_token(run.path)
    write_record(
        EndpointRecord(
            model_ref="toy@prod", model_name="toy", version="1", state=EndpointState.STOPPED,
            job_id="424242_0", replica=0, run_dir=str(run.path),
            token_file=str(token_path(run.path)), message="job ended COMPLETED",
        ),
        message="test",
    )  # fmt: skip
    return run.path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = write_site(tmp_path, "local")
    save_toys(site)
    return site


def test_every_services_endpoint_needs_a_login_and_actions_the_csrf_token(site: Site) -> None:
    name = fake_service(site).name
    with running(site) as srv:
        with httpx.Client(base_url=srv.url, trust_env=False) as anon:
            for path in ("api/services", f"api/services/{name}"):
                assert anon.get(path).status_code == 401, path
            assert anon.get("services", follow_redirects=False).status_code == 303
            assert anon.post("api/services", json={"model": "toy@prod"}).status_code == 401
        client, csrf = logged_in(srv)
        for path, body in (
            ("api/services", {"model": "toy@prod"}),
            (f"api/services/{name}/upgrade", {}),
            (f"api/services/{name}/rollback", None),
            (f"api/services/{name}/stop", None),
            (f"api/services/{name}/bench", {"duration": 1}),
        ):
            resp = client.post(path, json=body)
            assert resp.status_code == 403 and CSRF_HEADER in resp.json()["detail"], path
            wrong = client.post(path, json=body, headers={CSRF_HEADER: csrf + "x"})
            assert wrong.status_code == 403, path
        page = client.get(f"services/{name}")
        assert page.status_code == 200 and f'data-service="{name}"' in page.text
        assert "static/services.js" in page.text and "<script>" not in page.text


def test_services_listing_detail_and_bad_input(site: Site) -> None:
    run_dir = fake_service(site)
    name = run_dir.name
    with running(site) as srv:
        client, csrf = logged_in(srv)
        h = {CSRF_HEADER: csrf}
        assert client.get("api/services").json()["total"] == 0  # live ones only
        rows = client.get("api/services", params={"show": "all"}).json()["rows"]
        assert [(r["name"], r["model"], r["states"]) for r in rows] == [
            (name, "toy@prod", {"STOPPED": 1})
        ]
        assert client.get("api/services", params={"show": "all", "q": "nope"}).json()["rows"] == []
        d = client.get(f"api/services/{name}").json()
        assert d["alias"] == "prod" and not d["live"]
        assert [(r["replica"], r["state"], r["health"]) for r in d["replicas"]] == [
            (0, "STOPPED", "-")
        ]
        assert "token_file" not in d["replicas"][0]
        # Bad input: 4xx with a one-line reason, never a 5xx.
        bad = [
            (client.get("api/services", params={"show": "some"}), 422),
            (client.get("api/services/nope"), 404),
            (client.get("api/services/..%2F..%2Fetc"), 404),
            (client.post("api/services", json={"model": "toy@@x"}, headers=h), 400),
            (client.post("api/services", json={"model": "ghost@prod"}, headers=h), 404),
            (client.post("api/services", json={"model": "toy:1", "replicas": 0}, headers=h), 422),
            (
                client.post(
                    "api/services", json={"model": "toy:1", "reservation": "a b"}, headers=h
                ),
                400,
            ),  # fmt: skip
            (client.post(f"api/services/{name}/bench", json={"duration": 600}, headers=h), 422),
            (client.post(f"api/services/{name}/bench", json={"duration": 1}, headers=h), 409),
            (client.post(f"api/services/{name}/stop", headers=h), 409),  # nothing live
            (client.post(f"api/services/{name}/upgrade", json={"version": 0}, headers=h), 422),
            (client.post("api/services/nope/stop", headers=h), 404),
        ]
        for resp, code in bad:
            assert resp.status_code == code, (resp.request.url, resp.text)
        start_bad = client.post("api/services", json={"model": "ghost@prod"}, headers=h)
        assert "ghost" in start_bad.json()["detail"]
        stopped = client.post(f"api/services/{name}/stop", headers=h).json()["detail"]
        assert stopped == f"service {name}: no live replica"


def test_another_users_service_is_refused(site: Site) -> None:
    name = fake_service(site).name
    with running(site, viewer="someone-else") as srv:
        client, csrf = logged_in(srv)
        assert client.get("api/services", params={"show": "all"}).json()["total"] == 0
        resp = client.get(f"api/services/{name}")
        assert resp.status_code == 404
        assert resp.json()["detail"] == f"service {name!r}: no such service of user someone-else"
        for action in ("stop", "rollback", "upgrade", "bench"):
            body: dict[str, Any] = {"duration": 1} if action == "bench" else {}
            r = client.post(f"api/services/{name}/{action}", json=body, headers={CSRF_HEADER: csrf})
            assert r.status_code == 404, action
    with running(site, viewer="someone-else", admins=["someone-else"]) as srv:
        client, _ = logged_in(srv)
        assert client.get(f"api/services/{name}").status_code == 200


def test_percentiles_from_a_replicas_prometheus_text() -> None:
    metrics = ServeMetrics(frozenset({"/v1/predict", "/readyz"}))
    for ms in [3] * 50 + [30] * 45 + [300] * 5:  # 3 ms, 30 ms, 300 ms
        metrics.observe_request("/v1/predict", "POST", 200, ms / 1000)
    metrics.observe_request("/v1/predict", "POST", 422, 0.001)
    metrics.observe_request("/readyz", "GET", 200, 0.001)
    got = parse_metrics(metrics.render().decode())
    assert got["ok"] == 100 and got["requests"] == 101
    p50 = quantile(0.5, got["buckets"])
    p95 = quantile(0.95, got["buckets"])
    p99 = quantile(0.99, got["buckets"])
    assert p50 is not None and p95 is not None and p99 is not None
    assert 0.0025 < p50 <= 0.005 and 0.025 <= p95 <= 0.05 and 0.25 <= p99 <= 0.5
    assert quantile(0.5, []) is None
    assert parse_shape("3x32x32") == [3, 32, 32]
    with pytest.raises(Exception, match="shape '3,a'"):
        parse_shape("3,a")


# ---------------------------------------------------------------------- the real cluster


def wait_for(what: str, check: Any, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def wait_op(client: httpx.Client, name: str, action: str, timeout: float = 300) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        op = client.get(f"api/services/{name}").json()["operation"]
        assert op["action"] == action
        return op if op["state"] != "running" else None

    op = wait_for(f"{action} of {name}", done, timeout)
    assert op["state"] == "done", op
    return op


def live_service(client: httpx.Client, model: str, version: str) -> dict[str, Any]:
    """The one live service serving ``version``, READY."""

    def find() -> dict[str, Any] | None:
        rows = client.get("api/services", params={"q": model}).json()["rows"]
        ok = [r for r in rows if r["versions"] == [version] and r["ready_replicas"] >= 1]
        return ok[0] if ok else None

    return wait_for(f"{model} version {version} READY", find)


@pytest.mark.cluster
def test_a_real_service_started_measured_upgraded_rolled_back_and_stopped(
    cluster, tmp_path: Path
) -> None:
    site = write_site(tmp_path, "dev")
    save_toys(site)
    with running(site) as srv:
        client, csrf = logged_in(srv)
        h = {CSRF_HEADER: csrf}
        started = client.post("api/services", json={"model": "toy@prod", "replicas": 1,
                                                    "time": "10"}, headers=h)  # fmt: skip
        assert started.status_code == 200, started.text
        name = started.json()["name"]
        assert started.json()["job_id"] and Path(started.json()["run_dir"]).name == name
        live_service(client, "toy", "1")
        d = client.get(f"api/services/{name}").json()
        (rep,) = d["replicas"]
        assert (rep["state"], rep["health"], rep["version"]) == ("READY", "ready", "1")
        assert rep["node"] and rep["job_id"] == started.json()["job_id"] + "_0"
        assert [h["state"] for h in rep["history"]][-1] == "READY"
        assert d["status"]["desired_replicas"] == 1 and d["status"]["ready_replicas"] == 1

        # The performance test: the same load generator as `aimass bench`.
        bench = client.post(f"api/services/{name}/bench", headers=h, timeout=60,
                            json={"batch": 4, "duration": 1, "concurrency": 4})  # fmt: skip
        assert bench.status_code == 200, bench.text
        b = bench.json()
        assert b["requests_failed"] == 0 and b["requests_ok"] > 0 and b["requests_per_s"] > 0
        assert b["input_shape"] == [4, 6] and b["output_shape"] == [4, 3]
        assert 0 < b["p50_ms"] <= b["p95_ms"] <= b["p99_ms"]
        bad_shape = client.post(f"api/services/{name}/bench", headers=h,
                                json={"shape": "5", "duration": 1})  # fmt: skip
        assert bad_shape.status_code == 400, bad_shape.text

        # Latency and throughput scraped from the replica's /metrics (with the token).
        (rep,) = client.get(f"api/services/{name}").json()["replicas"]
        assert rep["requests_ok"] >= b["requests_ok"] and rep["p50_ms"] > 0, rep
        assert client.get(f"api/services/{name}").json()["series"]

        # Upgrade to version 2 (the alias is promoted first), then roll back to 1.
        up = client.post(f"api/services/{name}/upgrade", json={"version": 2}, headers=h)
        assert up.status_code == 200 and up.json()["operation"]["state"] == "running", up.text
        again = client.post(f"api/services/{name}/stop", headers=h)
        assert again.status_code == 409 and "upgrade is still running" in again.text
        op = wait_op(client, name, "upgrade")
        assert op["result"]["old_versions"] == ["1"] and op["result"]["new_version"] == "2"
        v2 = live_service(client, "toy", "2")
        assert v2["name"] == Path(op["result"]["new_run_dir"]).name
        assert {r.state for r in read_records(Path(d["run_dir"]))} == {"STOPPED"}
        back = client.post(f"api/services/{v2['name']}/rollback", headers=h)
        assert back.status_code == 200, back.text
        op = wait_op(client, v2["name"], "rollback")
        assert op["result"]["rolled_back_to"] == "toy:1" and op["result"]["new_version"] == "1"
        v1 = live_service(client, "toy", "1")

        # Another user sees none of it.
        with running(site, viewer="someone-else") as other:
            oc, _ = logged_in(other)
            assert oc.get(f"api/services/{v1['name']}").status_code == 404

        assert client.post(f"api/services/{v1['name']}/stop", headers=h).status_code == 200
        op = wait_op(client, v1["name"], "stop")
        assert op["result"]["cancelled"]
        assert {r.state for r in read_records(Path(v1["run_dir"]))} == {"STOPPED"}
        assert client.get("api/services", params={"q": "toy"}).json()["total"] == 0
