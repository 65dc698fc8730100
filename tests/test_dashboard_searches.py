"""The dashboard's Searches API over a real uvicorn server and a real httpx client.

Login and CSRF, 4xx on bad input, another user's search refused; a generated journal of
1,000 trials paged, sorted and filtered on the server and read incrementally (a poll parses
only what was appended); plots and parameter importance; cancel and resume; and a real small
search on the local Slurm cluster, its driver submitted from the dashboard.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import httpx
import pytest
from _sitefixtures import write_site
from test_dashboard_api import logged_in, running
from test_search_driver import write_spec

from aimass_hpc.config.search_spec import load_search_spec
from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.auth import CSRF_HEADER
from aimass_hpc.dashboard.searches import importance
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.search_driver import SearchDir, create_search

N_TRIALS = 1000


def make_search(site: Site, tmp: Path, n: int = 0, *, active: int = 0, **spec_kw) -> SearchDir:
    """A search under the site's searches root with ``n`` generated trials: finished ones
    whose objective is ``(x - 1)^2 + (0.5 if kind == "b")``, every 10th failed, and the
    last ``active`` still running. Written in a few locked appends, as a driver would."""
    spec = load_search_spec(write_spec(tmp, budget=max(n, 4), **spec_kw))
    sdir = create_search(spec, site)
    rng = random.Random(3)
    records: list[dict] = []
    now = time.time()
    for i in range(n):
        x, kind = rng.uniform(-3, 3), rng.choice(["a", "b"])
        records.append({"type": J.TRIAL_PROPOSED, "trial": i, "params": {"x": x, "kind": kind}})
        records.append({"type": J.TRIAL_SUBMITTED, "trial": i, "job_id": str(9_000_000 + i)})
        if i >= n - active:
            records.append({"type": J.TRIAL_RUNNING, "trial": i, "job_id": str(9_000_000 + i)})
        elif i % 10 == 9:
            records.append({"type": J.TRIAL_FAILED, "trial": i, "reason": "exit code 3",
                            "ended_at": now + i})  # fmt: skip
        else:
            value = (x - 1.0) ** 2 + (0.5 if kind == "b" else 0.0)
            records.append({"type": J.TRIAL_FINISHED, "trial": i, "value": value,
                            "ended_at": now + i})  # fmt: skip
    journal = sdir.journal()
    for start in range(0, len(records), 500):
        journal.append_many(records[start : start + 500])
    return sdir


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return write_site(tmp_path, "local")


def test_every_search_api_needs_a_login_and_actions_need_csrf(site: Site, tmp_path: Path) -> None:
    sid = make_search(site, tmp_path, 4).path.name
    with running(site) as srv, httpx.Client(base_url=srv.url, trust_env=False) as anon:
        for path in ("api/searches", f"api/searches/{sid}", f"api/searches/{sid}/trials",
                     f"api/searches/{sid}/plots"):  # fmt: skip
            assert anon.get(path).status_code == 401, path
        for path in (f"api/searches/{sid}/cancel", f"api/searches/{sid}/resume"):
            assert anon.post(path).status_code == 401, path
        for path in ("searches", f"searches/{sid}"):
            resp = anon.get(path)
            assert resp.status_code == 303 and resp.headers["location"].endswith("/login")
        client, csrf = logged_in(srv)
        with contextlib.closing(client):
            for action in ("cancel", "resume"):
                resp = client.post(f"api/searches/{sid}/{action}")
                assert resp.status_code == 403 and CSRF_HEADER in resp.json()["detail"]
                resp = client.post(f"api/searches/{sid}/{action}", headers={CSRF_HEADER: "x" * 40})
                assert resp.status_code == 403
            page = client.get(f"searches/{sid}")
            assert page.status_code == 200 and f'data-search="{sid}"' in page.text
            assert "static/vendor/chart.min.js" in page.text and "<script>" not in page.text
            assert client.get("searches").status_code == 200


def test_bad_input_is_a_4xx_with_one_line(site: Site, tmp_path: Path) -> None:
    sid = make_search(site, tmp_path, 4).path.name
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            for query, code, word in (
                ({"sort": "bogus"}, 400, "sort: expected one of id, state"),
                ({"sort": "param:nope"}, 400, "param:x"),
                ({"state": "exploded"}, 400, "state: expected one of proposed"),
                ({"order": "sideways"}, 422, ""),
                ({"page": 0}, 422, ""),
                ({"page_size": 501}, 422, ""),
            ):
                resp = client.get(f"api/searches/{sid}/trials", params=query)
                assert resp.status_code == code, (query, resp.text)
                assert word in str(resp.json()["detail"])
            for bad in ("nope", "..", "a%2Fb", "-x"):
                resp = client.get(f"api/searches/{bad}")
                assert resp.status_code in (404, 422), bad
            assert "no such search" in client.get("api/searches/nope").json()["detail"]


def test_another_users_searches_are_refused(site: Site, tmp_path: Path) -> None:
    sid = make_search(site, tmp_path, 4).path.name
    with running(site, viewer="somebody-else") as srv:
        client, csrf = logged_in(srv)
        with contextlib.closing(client):
            assert client.get("api/searches").json()["total"] == 0
            for path in (f"api/searches/{sid}", f"api/searches/{sid}/trials",
                         f"api/searches/{sid}/plots"):  # fmt: skip
                resp = client.get(path)
                assert resp.status_code == 404 and "somebody-else" in resp.json()["detail"]
            resp = client.post(f"api/searches/{sid}/cancel", headers={CSRF_HEADER: csrf})
            assert resp.status_code == 404
            assert not SearchDir(site.runs_root / "searches" / sid).state().cancel_requested
    with running(site, viewer="somebody-else", admins=["somebody-else"]) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            assert [r["id"] for r in client.get("api/searches").json()["rows"]] == [sid]


def test_a_thousand_trials_are_paged_sorted_and_read_incrementally(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdir = make_search(site, tmp_path, N_TRIALS, active=5)
    sid = sdir.path.name
    parsed: list[int] = []
    real_parse = J.Journal._parse_line

    def counting(self: J.Journal, raw: bytes, line: int):  # the real parser, counted
        parsed.append(line)
        return real_parse(self, raw, line)

    monkeypatch.setattr(J.Journal, "_parse_line", counting)
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            listing = client.get("api/searches").json()
            assert listing["total"] == 1
            row = listing["rows"][0]
            assert (row["id"], row["name"], row["state"]) == (sid, "quad", "stopped")
            assert (row["trials_done"], row["trials"], row["budget"]) == (995, 1000, 1000)

            first = client.get(f"api/searches/{sid}/trials").json()
            assert first["total"] == N_TRIALS and len(first["rows"]) == 50
            assert [t["id"] for t in first["rows"]] == list(range(50))
            assert first["rows"][0]["job_id"] == "9000000"
            read_once = len(parsed)
            assert read_once >= 2 * N_TRIALS  # the whole journal, once

            # Polling: nothing appended, nothing parsed, whatever the journal's length.
            for _ in range(3):
                client.get(f"api/searches/{sid}")
                client.get(f"api/searches/{sid}/trials", params={"page": 7})
                client.get(f"api/searches/{sid}/plots")
                client.get("api/searches")
            assert len(parsed) == read_once

            by_value = client.get(f"api/searches/{sid}/trials",
                                  params={"sort": "value", "page_size": 500}).json()  # fmt: skip
            values = [t["value"] for t in by_value["rows"]]
            assert values == sorted(values)
            detail = client.get(f"api/searches/{sid}").json()
            assert by_value["rows"][0]["id"] == detail["best"]["id"]
            assert detail["counts"] == {"finished": 896, "failed": 99, "running": 5}
            assert detail["columns"][-2:] == ["param:kind", "param:x"]  # the space's order
            last = client.get(f"api/searches/{sid}/trials",
                              params={"sort": "value", "order": "desc",
                                      "page": 20}).json()  # fmt: skip
            assert all(t["value"] is None for t in last["rows"])  # no value: last either way
            desc = client.get(f"api/searches/{sid}/trials",
                              params={"sort": "value", "order": "desc"}).json()  # fmt: skip
            top = [t["value"] for t in desc["rows"]]
            assert top == sorted(top, reverse=True)

            failed = client.get(f"api/searches/{sid}/trials", params={"state": "failed"}).json()
            assert failed["total"] == 99 and {t["state"] for t in failed["rows"]} == {"failed"}
            kinds = client.get(f"api/searches/{sid}/trials",
                               params={"sort": "param:kind", "page_size": 500}).json()  # fmt: skip
            assert kinds["rows"][0]["params"]["kind"] == "a"
            xs = client.get(f"api/searches/{sid}/trials",
                            params={"sort": "param:x", "order": "desc"}).json()["rows"]  # fmt: skip
            assert [t["params"]["x"] for t in xs] == sorted((t["params"]["x"] for t in xs),
                                                            reverse=True)  # fmt: skip

            plots = client.get(f"api/searches/{sid}/plots").json()
            curve = plots["best_so_far"]
            assert len(curve) == 896
            assert all(a["best"] >= b["best"] for a, b in zip(curve, curve[1:], strict=False))
            assert curve[-1]["best"] == detail["best"]["value"]
            axes = [a["name"] for a in plots["parallel"]["axes"]]
            assert axes == ["kind", "x", "objective"]
            assert len(plots["parallel"]["lines"]) == 896
            assert all(0 <= p <= 1 for line in plots["parallel"]["lines"] for p in line["pos"])
            imp = {i["param"]: i["importance"] for i in plots["importance"]}
            assert imp["x"] > 0.5 > imp["kind"]  # (x - 1)^2 decides; kind adds only 0.5

            # Three records appended (a trial ends): the next poll parses those three only.
            sdir.journal().append_many([
                {"type": J.TRIAL_FINISHED, "trial": 995 + k, "value": -1.0 - k}
                for k in range(3)
            ])  # fmt: skip
            before = len(parsed)
            now = client.get(f"api/searches/{sid}").json()
            assert now["counts"]["running"] == 2 and now["best"]["id"] == 997
            assert len(parsed) - before <= 3 + 3  # the new lines (the test's writer read too)


def test_importance_is_an_eta_squared_of_ranks() -> None:
    trials = []
    for i in range(40):
        t = J.TrialRecord(
            id=i, params={"a": i % 4, "b": ["u", "v"][(i // 4) % 2]}, state=J.FINISHED
        )
        t.value = float(i % 4)  # decided by a alone
        trials.append(t)
    out = {d["param"]: d for d in importance(trials, ["a", "b"])}
    assert out["a"]["importance"] == pytest.approx(1.0)
    assert out["b"]["importance"] == pytest.approx(0.0)  # independent of the value
    assert importance(trials[:1], ["a"]) == []  # one finished trial: nothing to say


def test_cancel_and_resume_follow_the_search_state(site: Site, tmp_path: Path) -> None:
    sid = make_search(site, tmp_path, 0).path.name
    with running(site) as srv:
        client, csrf = logged_in(srv)
        with contextlib.closing(client):
            resp = client.post(f"api/searches/{sid}/cancel", headers={CSRF_HEADER: csrf})
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"id": sid, "cancelled": True, "finished": True}
            assert client.get("api/searches").json()["rows"][0]["state"] == "cancelled"
            again = client.post(f"api/searches/{sid}/cancel", headers={CSRF_HEADER: csrf})
            assert again.status_code == 409 and "already finished" in again.json()["detail"]
            resume = client.post(f"api/searches/{sid}/resume", headers={CSRF_HEADER: csrf})
            assert resume.status_code == 409 and "already finished" in resume.json()["detail"]


@pytest.mark.cluster
def test_a_real_search_resumed_from_the_dashboard(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec = load_search_spec(write_spec(tmp_path, budget=4, parallel=2,
                                       extra='[trial]\ntime = "00:03:00"\n'))  # fmt: skip
    sid = create_search(spec, site).path.name
    with running(site) as srv:
        client, csrf = logged_in(srv)
        with contextlib.closing(client):
            assert client.get("api/searches").json()["rows"][0]["state"] == "stopped"
            resp = client.post(f"api/searches/{sid}/resume", headers={CSRF_HEADER: csrf})
            assert resp.status_code == 200, resp.text
            driver_job = resp.json()["driver_job_id"]
            assert driver_job and driver_job.isdigit()
            twice = client.post(f"api/searches/{sid}/resume", headers={CSRF_HEADER: csrf})
            assert twice.status_code == 409, twice.text  # its driver is queued or running
            deadline = time.monotonic() + 300
            while not (detail := client.get(f"api/searches/{sid}").json())["finished"]:
                assert time.monotonic() < deadline, detail
                time.sleep(1)
            assert detail["counts"] == {"finished": 4} and detail["state"] == "finished"
            assert detail["driver_jobs"] == [driver_job]
            trials = client.get(f"api/searches/{sid}/trials", params={"sort": "value"}).json()
            assert trials["total"] == 4
            assert all(t["job_id"].isdigit() for t in trials["rows"])
            assert trials["rows"][0]["id"] == detail["best"]["id"]
            plots = client.get(f"api/searches/{sid}/plots").json()
            assert len(plots["best_so_far"]) == 4 and len(plots["parallel"]["lines"]) == 4
