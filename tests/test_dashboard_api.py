"""The dashboard's HTTP API over a real uvicorn server and a real httpx client.

Login (one-time token -> HttpOnly SameSite=Strict cookie on the base URL), CSRF on every
action, 4xx on bad input, other users' jobs refused, server-side paging and filtering, the
Models search and actions on a real HDF5 repository, the base URL behind Open OnDemand's
``/node/`` (prefix kept) and ``/rnode/`` (prefix stripped) proxies, the app's OpenAPI schema
fuzzed with schemathesis (no 5xx), and a real job on the local Slurm cluster.
"""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
import uvicorn
from _sitefixtures import write_site
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.app import create_app
from aimass_hpc.dashboard.auth import COOKIE, CSRF_HEADER, Auth
from aimass_hpc.dashboard.jobs import current_user, visible
from aimass_hpc.dashboard.launch import TOKEN_ENV, prepare
from aimass_hpc.launch.runs import RunDir, index_job
from aimass_hpc.repo import ModelRepository

ME = current_user()
LOG = "0: rank zero says hi\n1: rank one says hi\n"  # srun --label


# ---------------------------------------------------------------------- helpers (also used by
# tests/test_dashboard_browser.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT/BASE/
    auth: Auth


@contextlib.contextmanager
def running(
    site: Site, *, base_url: str = "/", viewer: str = ME, admins: tuple[str, ...] | list[str] = ()
) -> Iterator[Running]:
    """The dashboard served by a real uvicorn server in a thread."""
    auth = Auth()
    app = create_app(site, viewer=viewer, admins=admins, base_url=base_url, auth=auth)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{port}{app.state.base_url}", auth)
    finally:
        server.should_exit = True
        thread.join(10)


def logged_in(srv: Running) -> tuple[httpx.Client, str]:
    """A client holding a session cookie, and the session's CSRF token."""
    client = httpx.Client(base_url=srv.url, trust_env=False, timeout=30)
    resp = client.get("login", params={"token": srv.auth.token})
    assert resp.status_code == 303 and resp.headers["location"].endswith("/jobs"), resp.text
    session = srv.auth.session(client.cookies.get(COOKIE))
    assert session is not None
    return client, session.csrf


def make_run(root: Path, name: str, job_id: str, state: str = "COMPLETED", log: str = "") -> RunDir:
    """A run directory as `aimass submit` leaves it, after `aimass status` saw it end."""
    run = RunDir.create(root, name)
    run.write_spec({"request": {"name": name, "nodes": 1, "gpus_per_node": 2}})
    run.write_script("#!/bin/bash\necho hi\n")
    outcome = {"state": state, "reason": "" if state == "COMPLETED" else "exit 1"}
    run.update_state(
        job_id=job_id, name=name, kind="job", outcome=outcome, submitted_at=time.time()
    )
    index_job(root, job_id, run)
    if log:
        (run.logs_dir / "restart-0.log").write_text(log)
    return run


def make_models(root: Path) -> ModelRepository:
    repo = ModelRepository(root)
    w = {"w": torch.ones(4)}
    repo.save("mlp", w, model_type="classifier", flops_per_sample=2e3, peak_memory_bytes=1 << 20,
              metrics={"acc": 0.8}, tags=["cv"])  # fmt: skip
    repo.save("mlp", w, model_type="classifier", flops_per_sample=5e6, peak_memory_bytes=1 << 26,
              metrics={"acc": 0.9}, tags=["cv"], parent="mlp:1")  # fmt: skip
    repo.save("lm", w, model_type="language-model", flops_per_sample=1e9, metrics={"ppl": 12.0})
    return repo


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = write_site(tmp_path, "local")
    make_run(site.runs_root, "alpha", "101", log=LOG)
    (site.runs_root.glob("*-alpha-*").__next__() / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "step", "step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3))
    )
    make_run(site.runs_root, "beta", "102", state="FAILED")
    make_models(site.models_root)
    return site


# ---------------------------------------------------------------------- auth


def test_every_api_and_page_needs_a_login(site: Site) -> None:
    with running(site) as srv, httpx.Client(base_url=srv.url, trust_env=False) as anon:
        for path in (
            "api/jobs",
            "api/jobs/101",
            "api/models",
            "api/models/mlp",
            "api/openapi.json",
        ):
            resp = anon.get(path)
            assert resp.status_code == 401, path
            assert "log in" in resp.json()["detail"]
        for path in ("jobs", "jobs/101", "models", "models/mlp"):
            resp = anon.get(path)
            assert resp.status_code == 303 and resp.headers["location"] == "/login", path
        resp = anon.post("api/jobs/101/cancel")
        assert resp.status_code == 401
        assert anon.get("login").status_code == 200  # the form


def test_the_token_logs_in_once_with_a_strict_cookie(site: Site) -> None:
    with running(site, base_url="/node/host/9999") as srv:
        with httpx.Client(base_url=srv.url, trust_env=False) as client:
            assert client.get("login", params={"token": "wrong"}).status_code == 401
            resp = client.post("login", data={"token": srv.auth.token})
            assert resp.status_code == 303 and resp.headers["location"] == "/node/host/9999/jobs"
            cookie = resp.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
            assert "Path=/node/host/9999/" in cookie
            client.cookies.set(COOKIE, resp.cookies[COOKIE])
            assert client.get("api/jobs").status_code == 200
        with httpx.Client(base_url=srv.url, trust_env=False) as other:
            # A spent token is refused, even from another browser.
            assert other.get("login", params={"token": srv.auth.token}).status_code == 401


def test_prepare_writes_the_token_readable_by_its_owner_only(site: Site, tmp_path: Path) -> None:
    token_file = tmp_path / "cache" / "token"
    ready = prepare(site, host="127.0.0.1", port=8765, base_url="/rnode/h/8765",
                    token_file=str(token_file))  # fmt: skip
    assert token_file.read_text().strip() == ready.token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert ready.login_url == f"http://127.0.0.1:8765/rnode/h/8765/login?token={ready.token}"


def test_actions_need_the_csrf_token(site: Site) -> None:
    with running(site) as srv:
        client, csrf = logged_in(srv)
        body = {"version": 1, "alias": "prod"}
        assert client.post("api/models/mlp/promote", json=body).status_code == 403
        wrong = {CSRF_HEADER: "x" + csrf}
        assert client.post("api/models/mlp/promote", json=body, headers=wrong).status_code == 403
        assert (
            client.delete("api/models/lm/versions/1", params={"confirm": "lm:1"}).status_code == 403
        )
        assert client.post("api/jobs/101/cancel").status_code == 403
        ok = client.post("api/models/mlp/promote", json=body, headers={CSRF_HEADER: csrf})
        assert ok.status_code == 200 and ok.json() == {"alias": "mlp@prod", "ref": "mlp:1"}


# ---------------------------------------------------------------------- jobs


def test_jobs_are_paged_and_filtered_on_the_server(site: Site) -> None:
    for i in range(118):
        make_run(site.runs_root, f"bulk{i:03d}", str(1000 + i))
    with running(site) as srv:
        client, _ = logged_in(srv)
        first = client.get("api/jobs").json()
        assert first["total"] == 120 and len(first["rows"]) == 50
        last = client.get("api/jobs", params={"page": 3}).json()
        assert len(last["rows"]) == 20
        seen = {
            r["job_id"]
            for p in (1, 2, 3)
            for r in client.get("api/jobs", params={"page": p}).json()["rows"]
        }
        assert len(seen) == 120
        named = client.get("api/jobs", params={"q": "bulk01"}).json()
        assert named["total"] == 10 and all(r["name"].startswith("bulk01") for r in named["rows"])
        failed = client.get("api/jobs", params={"state": "FAILED"}).json()
        assert [r["job_id"] for r in failed["rows"]] == ["102"]
        row = failed["rows"][0]
        assert row["owner"] == ME and row["gpus"] == {"nodes": 1, "gpus_per_node": 2}
        alpha = client.get("api/jobs", params={"q": "alpha"}).json()["rows"][0]
        assert alpha["progress"] == {"step": 3, "total_steps": None, "loss": 1 / 3}
        bad = client.get("api/jobs", params={"state": "SLEEPY"})
        assert bad.status_code == 400 and "state: expected one of" in bad.json()["detail"]
        assert client.get("api/jobs", params={"page": 0}).status_code == 422
        assert client.get("api/jobs", params={"page_size": 5000}).status_code == 422


def test_job_page_data_log_ranks_and_metrics(site: Site) -> None:
    with running(site) as srv:
        client, csrf = logged_in(srv)
        detail = client.get("api/jobs/101").json()
        assert detail["name"] == "alpha" and detail["status"]["state"] == "COMPLETED"
        assert (
            detail["script"].startswith("#!/bin/bash")
            and detail["spec"]["request"]["name"] == "alpha"
        )
        size = len(LOG)
        assert detail["logs"] == [{"restart": 0, "file": "restart-0.log", "bytes": size}]
        log = client.get("api/jobs/101/log").json()
        assert log["text"] == LOG and log["offset"] == size
        assert client.get("api/jobs/101/log", params={"offset": size}).json()["text"] == ""
        rank1 = client.get("api/jobs/101/log", params={"rank": 1}).json()
        assert rank1["text"] == "rank one says hi\n"
        metrics = client.get("api/jobs/101/metrics").json()["records"]
        assert [r["step"] for r in metrics] == [1, 2, 3]
        assert client.get("api/jobs/102/log").status_code == 404  # no log yet
        assert client.get("api/jobs/999").status_code == 404
        assert client.get("api/jobs/abc").status_code == 422
        assert client.get("api/jobs/101/log", params={"rank": -1}).status_code == 422
        # The local scheduler never ran 101: cancelling it is "no such job" (404).
        assert client.post("api/jobs/101/cancel", headers={CSRF_HEADER: csrf}).status_code == 404


def test_visible_only_to_the_owner_or_an_admin() -> None:
    assert visible("alice", "alice", [])
    assert not visible("alice", "bob", [])
    assert visible("alice", "bob", ["bob"])
    assert not visible(None, "bob", ["carol"])
    assert visible(None, "carol", ["carol"])


def test_another_users_jobs_are_refused(site: Site) -> None:
    # The run directories belong to this test's user; a dashboard run by someone else (not
    # an admin) shows none of them and acts on none.
    with running(site, viewer="someone-else") as srv:
        client, csrf = logged_in(srv)
        assert client.get("api/jobs").json()["total"] == 0
        for path in ("api/jobs/101", "api/jobs/101/log", "api/jobs/101/metrics"):
            resp = client.get(path)
            assert resp.status_code == 404 and "no such job of user someone-else" in resp.text
        assert client.post("api/jobs/101/cancel", headers={CSRF_HEADER: csrf}).status_code == 404
    with running(site, viewer="someone-else", admins=["someone-else"]) as srv:
        client, _ = logged_in(srv)
        rows = client.get("api/jobs").json()["rows"]
        assert {r["job_id"] for r in rows} == {"101", "102"} and rows[0]["owner"] == ME


def test_the_site_config_names_admins(site: Site, tmp_path: Path) -> None:
    # [dashboard] admins in the site config: such a user sees every user's jobs.
    site_admin = write_site(
        tmp_path, "local", runs=site.runs_root, models=site.models_root,
        name="local-admins", dashboard={"admins": ["someone-else"]},
    )  # fmt: skip
    with running(site_admin, viewer="someone-else") as srv:
        client, _ = logged_in(srv)
        assert {r["job_id"] for r in client.get("api/jobs").json()["rows"]} == {"101", "102"}
    with running(site_admin, viewer="not-an-admin") as srv:
        client, _ = logged_in(srv)
        assert client.get("api/jobs").json()["total"] == 0


# ---------------------------------------------------------------------- models


def test_models_search_form_and_actions(site: Site) -> None:
    with running(site) as srv:
        client, csrf = logged_in(srv)
        h = {CSRF_HEADER: csrf}

        def refs(**params: str) -> list[str]:
            resp = client.get("api/models", params=params)
            assert resp.status_code == 200, resp.text
            return [r["ref"] for r in resp.json()["rows"]]

        assert refs() == ["lm:1", "mlp:2", "mlp:1"]
        assert refs(type="classifier") == ["mlp:2", "mlp:1"]
        assert refs(type="classifier", flops="1M..") == ["mlp:2"]
        assert refs(memory="..1M") == ["mlp:1"]
        assert refs(metric="acc=0.85..") == ["mlp:2"]
        assert refs(name="l*", tag="cv") == []
        bad = client.get("api/models", params={"flops": "lots"})
        assert bad.status_code == 400 and "flops" in bad.json()["detail"]
        assert client.get("api/models", params={"type": "toaster"}).status_code == 400
        assert client.get("api/models", params={"metric": "acc"}).status_code == 400

        mlp = client.get("api/models/mlp").json()
        assert [v["version"] for v in mlp["versions"]] == [2, 1]
        assert mlp["versions"][0]["parent"] == "mlp:1"  # lineage
        assert client.get("api/models/nope").status_code == 404
        assert client.get("api/models/..").status_code in (404, 422)

        for v in (1, 2):
            client.post("api/models/mlp/promote", json={"version": v, "alias": "prod"}, headers=h)
        history = client.get("api/models/mlp").json()["aliases"][0]
        assert history["alias"] == "prod" and history["version"] == 2
        assert [e["action"] for e in history["history"]] == ["promote", "promote"]
        back = client.post("api/models/mlp/rollback", json={"alias": "prod"}, headers=h)
        assert back.json() == {"alias": "mlp@prod", "ref": "mlp:1"}
        again = client.post("api/models/mlp/rollback", json={"alias": "prod"}, headers=h)
        assert again.status_code == 409 and "no previous target" in again.json()["detail"]
        bad_alias = client.post(
            "api/models/mlp/promote", json={"version": 1, "alias": "a b"}, headers=h
        )
        assert bad_alias.status_code == 400
        assert (
            client.post(
                "api/models/mlp/promote", json={"version": 9, "alias": "x"}, headers=h
            ).status_code
            == 404
        )
        verified = client.post("api/models/mlp/verify", json={"version": 2}, headers=h).json()
        assert verified["ok"] and verified["tensors"] == 1

        unconfirmed = client.delete(
            "api/models/mlp/versions/2", params={"confirm": "mlp:1"}, headers=h
        )
        assert unconfirmed.status_code == 400 and "type mlp:2" in unconfirmed.json()["detail"]
        aliased = client.delete("api/models/mlp/versions/1", params={"confirm": "mlp:1"}, headers=h)
        assert aliased.status_code == 409  # mlp@prod points at it
        gone = client.delete("api/models/mlp/versions/2", params={"confirm": "mlp:2"}, headers=h)
        assert gone.json() == {"deleted": "mlp:2"}
        assert refs(name="mlp") == ["mlp:1"]


# ---------------------------------------------------------------------- base URL


@pytest.mark.parametrize("strip", [False, True], ids=["node-keeps-prefix", "rnode-strips-it"])
def test_base_url_behind_ondemand(site: Site, strip: bool) -> None:
    base = "/node/login1/8765/"
    with running(site, base_url=base) as srv:
        client, _ = logged_in(srv)
        # Behind /rnode/ the browser sees the prefixed URL (and sends the cookie scoped to
        # it); the app is asked without the prefix. The cookie is sent explicitly here.
        cookie = {COOKIE: client.cookies.get(COOKIE) or ""}
        root = srv.url.removesuffix(base) + "/" if strip else srv.url
        page = httpx.get(root + "jobs", cookies=cookie, trust_env=False)
        assert page.status_code == 200
        assert f'data-base="{base}"' in page.text and f'href="{base}models"' in page.text
        assert f'src="{base}static/dashboard.js"' in page.text
        assert httpx.get(root + "static/dashboard.js", trust_env=False).status_code == 200
        assert httpx.get(root + "api/jobs", cookies=cookie, trust_env=False).json()["total"] == 2


# ---------------------------------------------------------------------- schemathesis


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_openapi_fuzzed_without_5xx(site: Site, mode: GenerationMode) -> None:
    with running(site) as srv:
        client, csrf = logged_in(srv)
        headers = {"Cookie": f"{COOKIE}={client.cookies.get(COOKIE)}", CSRF_HEADER: csrf}
        schema = schemathesis.openapi.from_url(srv.url + "api/openapi.json", headers=headers)
        seen: set[str] = set()
        # Every operation gets its own examples: one strategy over the whole schema leaves
        # some operations out at random.
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)  # fmt: skip
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, checks=[not_a_server_error])
                seen.add(f"{case.method} {case.path}")

            check()
        assert {"GET /api/jobs", "GET /api/models", "POST /api/models/{name}/promote"} <= seen


# ---------------------------------------------------------------------- the real cluster


@pytest.mark.cluster
def test_a_real_slurm_job_is_listed_with_its_owner_and_cancelled(cluster, tmp_path: Path) -> None:
    from aimass_hpc.config.job_spec import load_job_spec
    from aimass_hpc.launch.submit import submit

    site = write_site(tmp_path, "dev")
    spec = tmp_path / "sleepy.toml"
    spec.write_text('[job]\nname = "dash-sleepy"\ncommand = ["sleep", "300"]\ntime = "5"\n')
    sub = submit(site, load_job_spec(str(spec), {}))
    assert sub.job_id
    with running(site) as srv:
        client, csrf = logged_in(srv)
        rows = client.get("api/jobs", params={"q": "dash-sleepy"}).json()["rows"]
        assert [(r["job_id"], r["owner"]) for r in rows] == [(sub.job_id, ME)]
        assert rows[0]["state"] in ("PENDING", "RUNNING")
        done = client.post(f"api/jobs/{sub.job_id}/cancel", headers={CSRF_HEADER: csrf}).json()
        assert done == {"job_id": sub.job_id, "cancelled": True}
        deadline = time.monotonic() + 60
        while client.get(f"api/jobs/{sub.job_id}").json()["status"]["state"] != "CANCELLED":
            assert time.monotonic() < deadline, "the job was not cancelled"
            time.sleep(1)
    with running(site, viewer="someone-else") as srv:
        client, _ = logged_in(srv)
        assert client.get(f"api/jobs/{sub.job_id}").status_code == 404


def test_a_chosen_token_and_bad_options_are_one_line_errors(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "t" * 32)
    ready = prepare(site, host="0.0.0.0", port=1, token_file=str(tmp_path / "tok"))
    assert ready.token == "t" * 32 and ready.login_url.endswith("/login?token=" + "t" * 32)
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(InputError, match="AIMASS_DASHBOARD_TOKEN: expected at least 16"):
        prepare(site, host="127.0.0.1", port=1, token_file=str(tmp_path / "tok"))
    monkeypatch.delenv(TOKEN_ENV)
    cli = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "dashboard", "--site", str(site.source),
         "--base-url", "node/x?y", "--token-file", str(tmp_path / "tok")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2
    assert cli.stderr.startswith("aimass: error: --base-url: expected a path")
    assert len(cli.stderr.splitlines()) == 1
