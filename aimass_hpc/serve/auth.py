"""Bearer-token auth for a service: one random token per run directory, file mode 0600.

On a shared cluster any user can reach a compute node's port, so every request except the
health probes must carry ``Authorization: Bearer <token>``. The token lives in the run
directory, readable only by its owner, so the owner's clients (and nobody else) can read it.
Several replicas may start at once in the same run directory: the first one to *link* its
token file into place wins and the others read the winner's, so they all agree.
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
from pathlib import Path

from aimass_hpc.common.errors import InputError, NotFoundError
from aimass_hpc.common.fsutil import fsync_dir

TOKEN_FILENAME = "serve.token"
TOKEN_ENV = "AIMASS_SERVE_TOKEN"


def token_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run directory keeps its service token."""
    return Path(run_dir) / TOKEN_FILENAME


def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def ensure_token(run_dir: str | os.PathLike[str]) -> str:
    """Return the run directory's token, creating it (mode 0600) if there is none yet."""
    path = token_path(run_dir)
    if path.exists():
        return read_token(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{TOKEN_FILENAME}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(generate_token() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic create-if-absent, also on NFS
        except FileExistsError:
            pass  # another replica won the race; use its token
        else:
            fsync_dir(path.parent)
    finally:
        os.unlink(tmp)
    return read_token(path)


def read_token(path: str | os.PathLike[str]) -> str:
    """Read a token file; refuses one that other users could read."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise NotFoundError(f"token file {p} does not exist") from None
    except PermissionError:
        raise NotFoundError(f"token file {p} is not readable by this user") from None
    if st.st_mode & 0o077:
        raise InputError(f"token file {p} has mode {st.st_mode & 0o777:o}; it must be 600")
    if not text:
        raise InputError(f"token file {p} is empty")
    return text


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
