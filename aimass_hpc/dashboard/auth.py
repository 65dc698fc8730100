"""Who may use the dashboard: a one-time login token, a session cookie and a CSRF token.

At start the dashboard prints a random token (and writes it to a 0600 file). The first
``/login?token=...`` (or the login form) that presents it gets a session: an HttpOnly,
SameSite=Strict cookie scoped to the base URL; the token is then spent. Every API call and page
needs the session; every state-changing call (POST, DELETE) must also carry the session's CSRF
token in the ``X-CSRF-Token`` header (the page holds it; another site's page cannot read it).
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from aimass_hpc.common.fsutil import atomic_write_text

COOKIE = "aimass_dashboard"
CSRF_HEADER = "X-CSRF-Token"
# Sessions one dashboard process keeps at most (each login makes one; the oldest go first).
MAX_SESSIONS = 64


@dataclass(frozen=True)
class Session:
    """One logged-in browser: its cookie value and the CSRF token its pages send back."""

    key: str
    csrf: str


class Auth:
    """The login token and the sessions of one dashboard process (in memory)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(32)
        self._spent = False
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def spent(self) -> bool:
        """Whether the login token was used already."""
        return self._spent

    def login(self, token: str) -> Session | None:
        """A new session for the right, unspent token; None otherwise (the token is spent)."""
        with self._lock:
            if self._spent or not hmac.compare_digest(token.encode(), self.token.encode()):
                return None
            self._spent = True
            session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(24))
            self._sessions[session.key] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            return session

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie value names, if any."""
        if not cookie:
            return None
        with self._lock:
            return self._sessions.get(cookie)

    @staticmethod
    def csrf_ok(session: Session, header: str | None) -> bool:
        """Whether a state-changing request carries the session's CSRF token."""
        return bool(header) and hmac.compare_digest(str(header).encode(), session.csrf.encode())


def default_token_file() -> Path:
    """``~/.cache/aimass/dashboard-token`` (``$XDG_CACHE_HOME`` respected)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "aimass" / "dashboard-token"


def write_token_file(path: Path, token: str) -> None:
    """Write the login token readable by its owner only (0600, atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_text(path, token + "\n", mode=0o600)
