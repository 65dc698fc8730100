"""The Services, Cluster and model-upload pages end to end in a real browser (Playwright
driving Debian's Chromium, headless) over the real local Slurm cluster: a service started from
the Services form, followed until READY, load-tested with the performance test form and
stopped; the Cluster page with its nodes and GPU allocation; a torch file uploaded on the
Models page. Screenshots are saved under the test's tmp dir.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _sitefixtures import write_site
from playwright.sync_api import expect, sync_playwright
from test_dashboard_api import running
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from test_dashboard_services import save_toys

from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve.endpoints import find_records

pytestmark = pytest.mark.cluster


def test_services_cluster_and_upload_in_a_browser(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    save_toys(site)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    upload_file = tmp_path / "uploaded-net.pt"
    torch.save({"w": torch.ones(3, 2), "b": torch.zeros(3)}, upload_file)

    with running(site, base_url="/node/localhost/8765/") as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dialogs: list[str] = []

        def on_dialog(dialog) -> None:  # window.confirm of Stop
            dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", on_dialog)
        page.goto(srv.url + "login?token=" + srv.auth.token)
        expect(page).to_have_url(srv.url + "jobs")

        # Services: start one from the form, then follow it until its replica is READY.
        page.click("#nav-services")
        expect(page.locator("#total")).to_have_text("0")
        page.click("#start-box summary")
        page.fill("#start input[name=model]", "toy@prod")
        page.fill("#start input[name=time]", "10")
        page.click("#start-submit")
        expect(page.locator("#notice")).to_contain_text("started ")
        row = page.locator("#services tbody tr").first
        expect(row).to_contain_text("toy@prod")
        expect(row.locator("td").nth(3)).to_have_text("1/1", timeout=180_000)
        page.screenshot(path=shots / "services.png", full_page=True)
        row.locator("a").click()
        expect(page).to_have_url(re.compile(r"/services/[^/]+$"))
        rep = page.locator("#replicas tbody tr").first
        expect(rep.locator("td").nth(1)).to_have_text("READY")
        expect(rep.locator("td").nth(2)).to_have_text("ready")
        expect(rep.locator("td").nth(3)).to_have_text("1")
        expect(page.locator("#versions")).to_have_text("1")

        # The performance test form: the `aimass bench` load generator, its result shown.
        page.fill("#bench input[name=batch]", "2")
        page.fill("#bench input[name=duration]", "1")
        page.fill("#bench input[name=concurrency]", "4")
        page.click("#bench-submit")
        expect(page.locator("#notice")).to_have_text("performance test done", timeout=60_000)
        result = page.locator("#bench-result")
        expect(result.locator('tr[data-key="failed"] td')).to_have_text("0")
        expect(result.locator('tr[data-key="input shape"] td')).to_have_text("2×6")
        assert float(result.locator('tr[data-key="requests/s"] td').inner_text()) > 0
        # The replica's own metrics (scraped with the service's token) show the requests.
        expect(rep.locator("td").nth(10)).not_to_have_text(re.compile(r"^(-|0)$"))
        expect(rep.locator("td").nth(7)).not_to_have_text("-")
        page.wait_for_timeout(3500)  # one more poll: a point on the throughput chart
        assert page.locator("#perf-chart").bounding_box()["height"] > 50
        page.screenshot(path=shots / "service.png", full_page=True)

        # Stop it (after the browser's confirmation); the replica drains and stops.
        page.click("#stop")
        expect(page.locator("#operation")).to_have_text(re.compile("^stop: done"), timeout=120_000)
        expect(rep.locator("td").nth(1)).to_have_text("STOPPED")
        assert dialogs and dialogs[-1].startswith("Stop service ")
        page.screenshot(path=shots / "service-stopped.png", full_page=True)

        # Cluster: partitions, nodes with GPU allocation, fair share.
        page.click("#nav-cluster")
        expect(page.locator("#nodes tbody tr")).to_have_count(3)
        expect(page.locator('#partitions tr[data-partition="debug"]')).to_contain_text("(default)")
        expect(page.locator('#nodes tr[data-node="node1"]')).to_contain_text("/4")
        expect(page.locator("#totals")).to_contain_text("GPUs ")
        expect(page.locator("#fairshare tbody tr")).not_to_have_count(0)
        page.screenshot(path=shots / "cluster.png", full_page=True)

        # Models: upload a torch state dict as a new version.
        page.click("#nav-models")
        expect(page.locator('script[src$="static/upload.js"]')).to_have_count(1)
        page.click("#upload-box summary")
        page.set_input_files("#upload input[type=file]", str(upload_file))
        expect(page.locator("#upload input[name=name]")).to_have_value("uploaded-net")
        page.fill("#upload input[name=tags]", "web, cv")
        page.click("#upload-submit")
        expect(page.locator("#upload-status")).to_have_text(
            "imported uploaded-net.pt as uploaded-net:1"
        )
        page.fill("#filters input[name=name]", "uploaded-*")
        page.click("#filters button[type=submit]")
        expect(page.locator('#models tbody tr[data-ref="uploaded-net:1"]')).to_contain_text(
            "web, cv"
        )
        page.screenshot(path=shots / "models-upload.png", full_page=True)
        assert page.locator("#error").is_hidden()
        browser.close()

    assert {r.state for r in find_records(site.runs_root, "toy")} == {"STOPPED"}
    loaded = ModelRepository(site.models_root).load("uploaded-net:1").state_dict
    assert torch.equal(loaded["w"], torch.ones(3, 2))
    for name in ("services", "service", "service-stopped", "cluster", "models-upload"):
        assert (shots / f"{name}.png").stat().st_size > 1000, name
