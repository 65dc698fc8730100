"""Crash-safe file writes for shared filesystems.

Everything written to a shared filesystem goes through here: write a temp file in the target
directory, flush + fsync it, rename it over the target, fsync the directory. A kill at any
instant leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import AimassError, InputError, SchedulerError

# What an OSError says about whose problem it is. These mean the path itself is unusable -- a
# parent is a regular file, a name is too long, no permission, a read-only filesystem -- which
# the user fixes by giving another path (exit 2). Anything else (a full disk, a quota, an I/O
# error, a stale NFS handle) is the system failing (exit 5).
PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EINVAL,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    }
)


def shown_path(path: str | os.PathLike[str], limit: int = 160) -> str:
    """``path`` for a one-line message: long ones are cut in the middle."""
    text = os.fspath(path)
    if len(text) <= limit:
        return text
    half = limit // 2 - 2
    return f"{text[:half]}...{text[-half:]}"


def os_error(exc: OSError, what: str) -> AimassError:
    """A one-line user error for ``exc``, met while doing ``what`` (which names the path).

    :data:`PATH_ERRNOS` become :class:`InputError` (exit 2: give another path), the rest
    :class:`SchedulerError` (exit 5: a system failure). The OS reason ends the message.
    """
    reason = exc.strerror or exc.__class__.__name__
    code = errno.errorcode.get(exc.errno or 0)
    if code:
        reason = f"{reason} ({code})"
    cls = InputError if exc.errno in PATH_ERRNOS else SchedulerError
    return cls(f"{what}: {reason}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Persist a directory entry change (create/rename/unlink) in ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, dir fsync)."""
    import tempfile  # here, not at the top: a dry run writes nothing and skips its import

    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def publish_file(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a whole file through ``write(tmp)`` and publish it at ``path`` atomically.

    The temp file is ``.NAME.tmp-PID-HEX`` beside the target (the name the model repository's
    gc recognises as a dead writer's leftover); it is fsynced, renamed over ``path``, and the
    directory is fsynced. On any failure the temp file is removed and nothing is published.
    """
    target = Path(path)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", mode)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`atomic_write_json`."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line and fsync: for JSON-lines logs (metrics, journals).

    A single ``write`` of a line opened with O_APPEND is not torn by concurrent appenders on
    a local filesystem; readers must still skip a trailing partial line after a crash.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: str | os.PathLike[str]) -> list[Any]:
    """Read a JSON-lines file, skipping a torn last line left by a crash."""
    out: list[Any] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for raw in fh:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    out.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


def check_input_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a regular file; ``InputError`` (one line) otherwise.

    Refuses a missing path, a directory, and a FIFO or device (reading one would block or
    never end) before anything tries to read it.
    """
    source = Path(path)
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} not found: {shown_path(source)}") from None
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, no permission
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{shown_path(source)}: cannot read the {what} ({reason})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{shown_path(source)}: is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{shown_path(source)}: not a regular file (a {what} must be a file)")
    return source


def read_user_text(path: str | os.PathLike[str], what: str) -> str:
    """A file a user named (spec, script, site config) as UTF-8 text; ``InputError`` (one line)
    for anything else: see :func:`check_input_file`, plus unreadable or non-UTF-8 bytes."""
    source = check_input_file(path, what)
    where = shown_path(source)
    try:
        return source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: the {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot read the {what} ({exc.strerror})") from None
