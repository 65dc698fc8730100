"""Starting the dashboard: the app, its one-time token (0600 file) and the login URL."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from aimass_hpc.common.errors import InputError
from aimass_hpc.common.fsutil import os_error, shown_path
from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.app import create_app, normalize_base_url, serve
from aimass_hpc.dashboard.auth import Auth, default_token_file, write_token_file
from aimass_hpc.dashboard.jobs import current_user

__all__ = ["TOKEN_ENV", "Ready", "prepare", "serve"]

# A login token chosen by whoever starts the dashboard (Open OnDemand's before.sh makes one,
# so that its connection view can log in); never on the command line, where ps shows it.
TOKEN_ENV = "AIMASS_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Ready:
    """A built dashboard, not yet serving."""

    app: FastAPI
    viewer: str
    token: str
    token_file: Path
    login_url: str


def prepare(
    site: Site,
    *,
    host: str,
    port: int,
    base_url: str = "/",
    admins: Iterable[str] = (),
    repo: str | None = None,
    token_file: str | None = None,
) -> Ready:
    """Build the app for the current user and write its login token (mode 0600)."""
    base = normalize_base_url(base_url)
    given = os.environ.get(TOKEN_ENV)
    if given is not None and (len(given) < MIN_TOKEN_CHARS or not given.isprintable()):
        raise InputError(f"${TOKEN_ENV}: expected at least {MIN_TOKEN_CHARS} printable characters")
    auth = Auth(given or None)
    path = Path(token_file).expanduser() if token_file else default_token_file()
    try:
        write_token_file(path, auth.token)
    except OSError as exc:
        raise os_error(exc, f"--token-file {shown_path(path)}: cannot write it") from None
    viewer = current_user()
    app = create_app(site, viewer=viewer, admins=admins, base_url=base, repo_path=repo, auth=auth)
    if host in ("0.0.0.0", "::", ""):  # every address: name this machine instead
        host = socket.gethostname()
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}{base}login?token={auth.token}"
    return Ready(app, viewer, auth.token, path, url)
