"""The dashboard keeps parsed ``state.json`` files and metrics summaries between polls: a
changed, replaced or removed file is seen at the next poll (real server, real httpx)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from _sitefixtures import write_site
from test_dashboard_api import logged_in, make_run, running
from test_dashboard_training import write_metrics

from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.filecache import FileCache


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return write_site(tmp_path, "local")


def test_a_file_is_parsed_again_only_after_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"n": 1}')
    cache: FileCache[dict[str, int]] = FileCache()
    parsed: list[int] = []

    def parse() -> dict[str, int]:
        data = json.loads(path.read_text())
        parsed.append(data["n"])
        return data

    assert cache.get(path, parse) == {"n": 1} and cache.get(path, parse) == {"n": 1}
    assert parsed == [1]
    path.write_text('{"n": 22}')  # another size
    assert cache.get(path, parse) == {"n": 22} and parsed == [1, 22]
    cache.keep({tmp_path / "elsewhere"})
    assert cache.get(path, parse) == {"n": 22} and parsed == [1, 22, 22]  # forgotten: parsed
    path.unlink()
    with pytest.raises(FileNotFoundError):
        cache.get(path, parse)


def test_jobs_and_training_lists_follow_changed_files(site: Site) -> None:
    run = make_run(site.runs_root, "train-a", "301")
    write_metrics(run.path, 10)
    gone = make_run(site.runs_root, "short-lived", "302")
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            jobs = client.get("api/jobs").json()
            assert {r["job_id"] for r in jobs["rows"]} == {"301", "302"}
            assert next(r for r in jobs["rows"] if r["job_id"] == "301")["progress"]["step"] == 10
            assert client.get("api/training").json()["rows"][0]["step"] == 10

            run.update_state(name="renamed")  # an atomic replace of state.json
            write_metrics(run.path, 25)  # metrics.jsonl grew
            shutil.rmtree(gone.path)
            jobs = client.get("api/jobs").json()
            assert [(r["job_id"], r["name"]) for r in jobs["rows"]] == [("301", "renamed")]
            assert jobs["rows"][0]["progress"]["step"] == 25
            training = client.get("api/training").json()
            assert training["total"] == 1 and training["rows"][0]["step"] == 25
            assert training["rows"][0]["name"] == "renamed"
            assert client.get("api/jobs", params={"page_size": 0}).status_code == 422
            assert client.get("api/training", params={"page": 0}).status_code == 422


def test_services_list_without_services_and_with_a_runs_root_missing(site: Site) -> None:
    make_run(site.runs_root, "plain-job", "303")  # a run directory, no endpoint records
    with running(site) as srv:
        client, _ = logged_in(srv)
        with contextlib.closing(client):
            listing = client.get("api/services", params={"show": "all"}).json()
            assert listing == {"total": 0, "page": 1, "page_size": 50, "rows": []}
            shutil.rmtree(site.runs_root)
            assert client.get("api/services").json()["total"] == 0
            resp = client.get("api/services", params={"q": "x" * 201})
            assert resp.status_code == 422
