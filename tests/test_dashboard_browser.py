"""The dashboard end to end in a real browser (Playwright driving Debian's Chromium, headless)
over the real local Slurm cluster: a real `aimass submit` job among 1,000 earlier runs, and a
real HDF5 model repository.

Logs in with the printed token, opens Jobs (and times it at 1,001 rows), the job's page and its
log, then Models: searches by type and FLOPs range, promotes an alias and deletes a version
through the confirmation dialog. A screenshot of each page is saved under the test's tmp dir.
Playwright's own browsers are never downloaded: the system's /usr/bin/chromium is used.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sitefixtures import write_site
from playwright.sync_api import expect, sync_playwright
from test_dashboard_api import make_models, make_run, running

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SYNTHETIC_RUNS = 1000


def test_jobs_and_models_in_a_browser(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    for i in range(SYNTHETIC_RUNS):  # older runs, as `aimass status` left them
        make_run(site.runs_root, f"old-{i:04d}", str(5_000_000 + i))
    spec = tmp_path / "hello.toml"
    spec.write_text('[job]\nname = "dash-hello"\ntime = "5"\n'
                    'command = ["bash", "-c", "echo hello from the dashboard test"]\n')  # fmt: skip
    submitted = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "submit", "--site", str(site.source), str(spec),
         "--wait", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    # Curves come from the run's metrics.jsonl, which a training job's rank 0 writes; this
    # plain job wrote none, so its run directory gets the records a short training would.
    run_dir = Path(json.loads(submitted.stdout)["run_dir"])
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "step", "step": s, "loss": 2.0 / s, "samples_per_s": 100.0 + s}) + "\n"
        for s in range(1, 21)
    ))  # fmt: skip
    sleepy = tmp_path / "sleepy.toml"
    sleepy.write_text('[job]\nname = "dash-sleepy"\ntime = "5"\ncommand = ["sleep", "300"]\n')
    queued = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "submit", "--site", str(site.source), str(sleepy),
         "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    sleepy_id = json.loads(queued.stdout)["job_id"]
    make_models(site.models_root)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with running(site, base_url="/node/localhost/8765/") as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs: list[str] = []

        def on_dialog(dialog) -> None:  # window.confirm (cancel) and window.prompt (alias)
            dialogs.append(dialog.message)
            dialog.accept("prod")

        page.on("dialog", on_dialog)

        # Log in with the token: the app sets its cookie and sends the browser to Jobs.
        page.goto(srv.url + "login?token=" + srv.auth.token)
        expect(page).to_have_url(srv.url + "jobs")
        started = time.monotonic()
        page.goto(srv.url + "jobs")
        expect(page.locator("#total")).to_have_text(str(SYNTHETIC_RUNS + 2))
        expect(page.locator("#jobs tbody tr")).to_have_count(50)
        jobs_load = time.monotonic() - started
        row = page.locator(f'#jobs tbody tr[data-job="{job_id}"]')
        expect(row).to_contain_text("dash-hello")
        expect(row).to_contain_text("COMPLETED")
        page.screenshot(path=shots / "jobs.png", full_page=True)

        # Filters live in the URL: a linkable, filtered listing.
        page.fill("input[name=q]", "dash-")
        page.click("#filters button[type=submit]")
        expect(page.locator("#total")).to_have_text("2")
        assert "q=dash-" in page.url
        expect(page.locator(f'#jobs tr[data-job="{job_id}"]')).to_contain_text("step 20 loss 0.1")

        # Cancel the sleeping job from its page (after the browser's confirmation).
        page.click(f'#jobs a[href$="/jobs/{sleepy_id}"]')
        expect(page.locator("#state")).to_have_text(re.compile("PENDING|RUNNING"))
        page.click("#cancel")
        expect(page.locator("#state")).to_have_text("CANCELLED", timeout=60_000)
        assert dialogs == [f"Cancel job {sleepy_id}?"]
        page.screenshot(path=shots / "job-cancelled.png", full_page=True)
        page.go_back()

        page.click(f'#jobs a[href$="/jobs/{job_id}"]')
        expect(page.locator("#state")).to_have_text("COMPLETED")
        expect(page.locator("#log")).to_contain_text("hello from the dashboard test")
        expect(page.locator("#script")).to_contain_text("#!/bin/bash")
        expect(page.locator("#metrics svg.chart")).to_have_count(2)  # loss, samples_per_s
        expect(page.locator("#metrics")).to_contain_text("loss (last 0.1)")
        page.screenshot(path=shots / "job.png", full_page=True)

        page.click("#nav-models")
        expect(page.locator("#models tbody tr")).to_have_count(3)
        # The filters' own fields: the upload form (upload.js) has a "type" select too.
        page.select_option("#filters select[name=type]", "classifier")
        page.fill("#filters input[name=flops]", "1M..")
        page.click("#filters button[type=submit]")
        expect(page.locator("#models tbody tr")).to_have_count(1)
        expect(page.locator('#models tbody tr[data-ref="mlp:2"]')).to_be_visible()
        assert "type=classifier" in page.url and "flops=1M.." in page.url
        page.screenshot(path=shots / "models.png", full_page=True)

        page.click('#models a[href$="/models/mlp"]')
        expect(page.locator("#versions tbody tr")).to_have_count(2)
        page.click('#versions tr[data-ref="mlp:2"] button.promote')
        expect(page.locator("#notice")).to_have_text("mlp@prod -> mlp:2")
        expect(page.locator('#aliases tr[data-alias="prod"]')).to_contain_text("2")
        assert dialogs[-1] == "Point which alias at mlp:2?"
        page.click('#versions tr[data-ref="mlp:2"] button.verify')
        expect(page.locator("#notice")).to_contain_text("mlp:2: ok (1 tensors")

        page.click('#versions tr[data-ref="mlp:1"] button.delete')
        expect(page.locator("#confirm-delete")).to_be_visible()
        page.fill("#delete-typed", "mlp:1")
        page.click("#delete-ok")
        expect(page.locator("#notice")).to_have_text("deleted mlp:1")
        expect(page.locator("#versions tbody tr")).to_have_count(1)
        page.screenshot(path=shots / "model.png", full_page=True)
        assert page.locator("#error").is_hidden()
        browser.close()

    for name in ("jobs", "job", "job-cancelled", "models", "model"):
        assert (shots / f"{name}.png").stat().st_size > 1000, name
    report = f"Jobs page with {SYNTHETIC_RUNS + 2} runs loaded in {jobs_load:.2f}s"
    (tmp_path / "page-load.txt").write_text(report + "\n")
    print(report, "; screenshots in", shots)


def test_models_page_with_a_thousand_versions(cluster, tmp_path: Path) -> None:
    import torch

    from aimass_hpc.repo import ModelRepository

    site = write_site(tmp_path, "dev")
    repo = ModelRepository(site.models_root)
    for i in range(1000):
        repo.save(f"net{i % 10}", {"w": torch.ones(2)}, model_type="classifier",
                  flops_per_sample=1e3 * (i + 1), metrics={"acc": i / 1000})  # fmt: skip
    with running(site) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(srv.url + "login?token=" + srv.auth.token)
        started = time.monotonic()
        page.goto(srv.url + "models")
        expect(page.locator("#total")).to_have_text("1000")
        expect(page.locator("#models tbody tr")).to_have_count(50)
        models_load = time.monotonic() - started
        page.click("#next")
        expect(page.locator("#pageno")).to_have_text("2 of 20")
        assert "page=2" in page.url
        page.goto(srv.url + "models?flops=..10K&page=1")  # a link with filters in it
        expect(page.locator("#total")).to_have_text("10")
        page.screenshot(path=tmp_path / "models-1000.png", full_page=True)
        browser.close()
    report = f"Models page with 1000 versions loaded in {models_load:.2f}s"
    (tmp_path / "page-load.txt").write_text(report + "\n")
    print(report)
