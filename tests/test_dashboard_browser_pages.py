"""The Training and Searches pages end to end in a real browser (Playwright driving Debian's
Chromium, headless) over the real local Slurm cluster.

Training: two runs' curves overlaid by ticking them, the selection in the URL, and the link
opened again. Searches: a generated search of 1,000 trials (load timed; sorted by a column,
filtered by state; best-so-far, parallel coordinates and importance drawn with Chart.js), and
a real search resumed from its page (its driver a batch job) and then cancelled while its
trials run. A screenshot of each page is saved under the test's tmp dir.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from _sitefixtures import write_site
from playwright.sync_api import expect, sync_playwright
from test_dashboard_api import make_run, running
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from test_dashboard_searches import N_TRIALS, make_search
from test_dashboard_training import write_metrics
from test_search_driver import write_spec

from aimass_hpc.config.search_spec import load_search_spec
from aimass_hpc.launch.search_driver import create_search

pytestmark = pytest.mark.cluster


def chart_datasets(page, selector: str) -> list[int]:
    """Points in each dataset of the Chart.js chart on the canvas ``selector``."""
    return page.evaluate(
        "(sel) => Chart.getChart(document.querySelector(sel)).data.datasets"
        ".map((d) => d.data.length)",
        selector,
    )


def test_training_and_searches_in_a_browser(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    write_metrics(make_run(site.runs_root, "curve-a", "7000001").path, 40)
    write_metrics(make_run(site.runs_root, "curve-b", "7000002").path, 60, scale=2.0)
    (tmp_path / "big").mkdir()
    big = make_search(site, tmp_path / "big", N_TRIALS).path.name
    (tmp_path / "live").mkdir()
    spec = load_search_spec(write_spec(
        tmp_path / "live", budget=4, parallel=2, env={"OBJ_SLEEP": "240"},
        extra='[trial]\ntime = "00:05:00"\n',
    ))  # fmt: skip
    live = create_search(spec, site).path.name
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with running(site, base_url="/node/localhost/8766/") as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dialogs: list[str] = []

        def on_dialog(dialog) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", on_dialog)
        page.goto(srv.url + "login?token=" + srv.auth.token)
        expect(page).to_have_url(srv.url + "jobs")

        # ---- Training: tick two runs, their curves are overlaid, the URL is the link.
        page.click("#nav-training")
        expect(page.locator("#total")).to_have_text("2")
        page.check('#runs tr[data-job="7000001"] input.pick')
        expect(page.locator('#curves [data-series="step-loss"] canvas')).to_be_visible()
        page.check('#runs tr[data-job="7000002"] input.pick')
        expect(page.locator("#selected")).to_have_text("7000001, 7000002")
        assert "runs=7000001%2C7000002" in page.url or "runs=7000001,7000002" in page.url
        loss = '#curves [data-series="step-loss"] canvas'
        expect(page.locator("#curves .chartbox")).to_have_count(4)  # loss, samples/s, lr, val_acc
        page.wait_for_function(
            "(s) => Chart.getChart(document.querySelector(s)).data.datasets.length === 2", arg=loss
        )
        assert chart_datasets(page, loss) == [40, 60]
        page.screenshot(path=shots / "training.png", full_page=True)
        link = page.url
        page.goto(srv.url + "jobs")
        page.goto(link)  # the comparison, opened from its link
        expect(page.locator('#runs tr[data-job="7000002"] input.pick')).to_be_checked()
        page.wait_for_function(
            "(sel) => { const c = document.querySelector(sel); return c && Chart.getChart(c) &&"
            " Chart.getChart(c).data.datasets.length === 2; }", arg=loss,
        )  # fmt: skip
        page.click("#clear")
        expect(page.locator("#curves .chartbox")).to_have_count(0)
        expect(page.locator("#nocurves")).to_be_visible()

        # ---- Searches: the list, then 1,000 trials paged, sorted and filtered on the server.
        page.click("#nav-searches")
        expect(page.locator("#total")).to_have_text("2")
        expect(page.locator(f'#searches tr[data-search="{big}"]')).to_contain_text("1000/1000")
        page.screenshot(path=shots / "searches.png", full_page=True)
        started = time.monotonic()
        page.click(f'#searches a[href$="/searches/{big}"]')
        expect(page.locator("#total")).to_have_text(str(N_TRIALS))
        expect(page.locator("#trials tbody tr")).to_have_count(50)
        page.wait_for_function(
            "() => { const c = Chart.getChart(document.getElementById('parallel-chart'));"
            " return c && c.data.datasets.length > 0; }"
        )
        search_load = time.monotonic() - started
        assert chart_datasets(page, "#best-chart") == [900, 900]
        assert len(chart_datasets(page, "#parallel-chart")) == 900
        assert chart_datasets(page, "#importance-chart") == [2]
        page.click('#trials th[data-col="value"]')
        expect(page.locator("#trials tbody tr").first).to_have_class("best")
        assert "sort=value" in page.url and "order=asc" in page.url
        page.click('#trials th[data-col="value"]')
        expect(page.locator('#trials th[data-col="value"]')).to_have_class(
            re.compile("sorted-desc")
        )
        page.select_option("select[name=state]", "failed")
        page.click("#filters button[type=submit]")
        expect(page.locator("#total")).to_have_text("100")
        expect(page.locator("#trials tbody tr").first).to_contain_text("failed")
        job_link = page.locator('#trials tbody tr a[href*="/jobs/"]').first
        expect(job_link).to_have_attribute("href", re.compile(r"/node/localhost/8766/jobs/9\d+$"))
        page.screenshot(path=shots / "search-1000.png", full_page=True)

        # ---- A real search: resume it (its driver a batch job), then cancel it mid-run.
        page.goto(srv.url + f"searches/{live}")
        expect(page.locator("#sstate")).to_have_text("stopped")
        page.click("#resume")
        expect(page.locator("#notice")).to_have_text(re.compile(r"driver job \d+ submitted"))
        expect(page.locator("#trials tbody tr td.state-running")).to_have_count(2, timeout=120_000)
        expect(page.locator("#sstate")).to_have_text("running")
        page.screenshot(path=shots / "search-running.png", full_page=True)
        page.click("#cancel")
        expect(page.locator("#sstate")).to_have_text("cancelled", timeout=90_000)
        expect(page.locator("#trials tbody tr td.state-cancelled")).to_have_count(2)
        expect(page.locator("#cancel")).to_be_disabled()
        assert dialogs == [f"Cancel search {live} and its running trials?"]
        page.screenshot(path=shots / "search-cancelled.png", full_page=True)
        assert page.locator("#error").is_hidden()
        browser.close()

    for name in ("training", "searches", "search-1000", "search-running", "search-cancelled"):
        assert (shots / f"{name}.png").stat().st_size > 1000, name
    report = f"Search page with {N_TRIALS} trials loaded in {search_load:.2f}s"
    (tmp_path / "page-load.txt").write_text(report + "\n")
    print(report, "; screenshots in", shots)
