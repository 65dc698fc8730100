"""Model upload on the dashboard (``POST /api/models/upload``): a torch ``.pt`` state dict and
a ``.safetensors`` file become new versions of a real HDF5 repository, as ``aimass models
import`` makes them; login, CSRF, bad files and the size limit are refused with a 4xx."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
import torch
from _sitefixtures import write_site
from safetensors.torch import save as save_safetensors
from test_dashboard_api import logged_in, running

from aimass_hpc.config.site import Site
from aimass_hpc.dashboard import upload
from aimass_hpc.dashboard.auth import CSRF_HEADER
from aimass_hpc.repo import ModelRepository

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}


def pt_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return write_site(tmp_path, "local")


def test_pt_and_safetensors_uploads_become_versions(site: Site) -> None:
    with running(site) as srv:
        client, csrf = logged_in(srv)
        h = {CSRF_HEADER: csrf, "Content-Type": "application/octet-stream"}
        one = client.post("api/models/upload", headers=h, content=pt_bytes(STATE), params={
            "name": "net", "filename": "net.pt", "tag": ["web", "cv"], "type": "classifier",
            "metric": "acc=0.75", "description": "from the browser"})  # fmt: skip
        assert one.status_code == 200, one.text
        assert one.json()["ref"] == "net:1" and one.json()["bytes"] > 0
        two = client.post("api/models/upload", headers=h, content=save_safetensors(STATE),
                          params={"name": "net", "filename": "net.safetensors"})  # fmt: skip
        assert two.status_code == 200 and two.json()["ref"] == "net:2", two.text
        rows = client.get("api/models", params={"name": "net"}).json()["rows"]
        assert [r["ref"] for r in rows] == ["net:2", "net:1"]
        assert rows[1]["tags"] == ["web", "cv"] and rows[1]["model_type"] == "classifier"
        assert rows[1]["metrics"] == {"acc": 0.75}
    repo = ModelRepository(site.models_root)
    for ref in ("net:1", "net:2"):
        loaded = repo.load(ref).state_dict
        assert torch.equal(loaded["w"], STATE["w"]) and torch.equal(loaded["b"], STATE["b"])
        assert repo.verify(ref).ok
    assert repo.get("net:1").run["imported_from"] == "dashboard upload net.pt"


def test_upload_needs_login_and_csrf_and_refuses_bad_files(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"name": "net", "filename": "net.pt"}
    with running(site) as srv:
        with httpx.Client(base_url=srv.url, trust_env=False) as anon:
            assert anon.post("api/models/upload", params=params, content=b"x").status_code == 401
        client, csrf = logged_in(srv)
        no_csrf = client.post("api/models/upload", params=params, content=pt_bytes(STATE))
        assert no_csrf.status_code == 403
        h = {CSRF_HEADER: csrf}

        def post(content: bytes, **p: str) -> httpx.Response:
            return client.post("api/models/upload", headers=h, params={**params, **p},
                               content=content)  # fmt: skip

        cases = [
            (post(b"not a model at all"), 400, "cannot import net.pt: not a safe torch"),
            (post(pt_bytes(STATE), filename="net.exe"), 400, "expected a .pt, .pth"),
            (post(b""), 400, "the upload is empty"),
            (post(pt_bytes(STATE), name="../x"), 422, ""),
            (post(pt_bytes(STATE), name="a b"), 422, ""),
            (post(pt_bytes(STATE), type="toaster"), 400, "type: expected one of"),
            (post(pt_bytes(STATE), metric="acc"), 400, "metric: expected NAME=NUMBER"),
            (post(pt_bytes({"w": [1, 2]})), 400, "cannot import net.pt: expected a state dict"),
        ]
        for resp, code, text in cases:
            assert resp.status_code == code, (resp.text, code)
            assert text in resp.text
        # Past the size limit: 413 while streaming, and nothing is stored.
        monkeypatch.setattr(upload, "MAX_UPLOAD_BYTES", 1000)
        big = post(pt_bytes({"w": torch.zeros(1000)}))
        assert big.status_code == 413 and "too large" in big.json()["detail"]
        assert client.get("api/models").json()["total"] == 0
