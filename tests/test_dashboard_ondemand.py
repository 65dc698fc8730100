"""The Open OnDemand example (examples/ondemand-dashboard/) starts a working dashboard.

Open OnDemand itself is not here: its basic template's helpers (``find_port``,
``create_passwd``) are defined as it defines them, ``script.sh.erb``'s one ERB expression is
filled in with a shell-quoted value (Ruby's ``shellescape`` in OnDemand), and the connection
view's form is posted by httpx. The site path holds quotes and ``$(...)``, which must reach
``aimass`` byte for byte.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from _sitefixtures import write_site

from aimass_hpc.config.site import PACKAGE_ROOT
from aimass_hpc.dashboard.auth import COOKIE

APP = PACKAGE_ROOT / "examples" / "ondemand-dashboard"
ONDEMAND_HELPERS = r"""
find_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
create_passwd() { tr -dc 'A-Za-z0-9' < /dev/urandom | head -c "$1"; }
host=127.0.0.1
"""


def _rendered_script(site_path: str) -> str:
    text = (APP / "template" / "script.sh.erb").read_text()
    text = re.sub(r"^<% require \"shellwords\" -%>\n", "", text, flags=re.M)
    expr = "<%= context.aimass_site.to_s.shellescape %>"
    assert expr in text
    return text.replace(expr, shlex.quote(site_path))


def test_the_ondemand_app_serves_the_dashboard_under_node(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    hostile = tmp_path / "it's $(touch pwned) `id`.toml"
    shutil.copy(str(site.source), hostile)
    job_dir = tmp_path / "session"
    job_dir.mkdir()
    (job_dir / "before.sh").write_text((APP / "template" / "before.sh.erb").read_text())
    (job_dir / "script.sh").write_text(_rendered_script(str(hostile)))
    assert subprocess.run(["bash", "-n", str(job_dir / "script.sh")]).returncode == 0
    wrapper = ONDEMAND_HELPERS + "source ./before.sh\nsource ./script.sh\n"
    proc = subprocess.Popen(
        ["bash", "-c", wrapper], cwd=job_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("aimass dashboard for ") and "on site local" in lines[0], lines
        url = lines[1].split("open:", 1)[1].strip()
        match = re.fullmatch(r"http://[^:/]+:(\d+)(/node/127\.0\.0\.1/\1/)login\?token=(\S+)", url)
        assert match, url
        port, base, token = match.groups()
        assert (job_dir / "dashboard-token").read_text().strip() == token
        assert len(token) == 32
        # The connection view posts the password (the token) to /node/HOST/PORT/login.
        root = f"http://127.0.0.1:{port}{base}"
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = httpx.post(root + "login", data={"token": token}, trust_env=False)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                time.sleep(0.2)
        assert resp.status_code == 303 and resp.headers["location"] == base + "jobs"
        assert f"Path={base}" in resp.headers["set-cookie"]
        page = httpx.get(root + "jobs", cookies={COOKIE: resp.cookies[COOKIE]}, trust_env=False)
        assert page.status_code == 200 and f'data-base="{base}"' in page.text
    finally:
        proc.terminate()
        proc.wait(10)
    assert not (job_dir / "pwned").exists() and not (tmp_path / "pwned").exists()
