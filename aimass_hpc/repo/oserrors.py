"""Operating-system failures turned into one-line user errors (no tracebacks in the CLI)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from aimass_hpc.common.errors import AimassError, InputError


class StorageError(AimassError):
    """The filesystem failed under us (disk full, quota, I/O error): a system failure."""

    exit_code = 5


@contextmanager
def os_errors(action: str) -> Iterator[None]:
    """Re-raise ``OSError`` from the block as an ``AimassError`` that says what was being done."""
    try:
        yield
    except AimassError:
        raise
    except PermissionError as exc:
        where = exc.filename or ""
        raise InputError(f"permission denied while {action}: {where}".rstrip(": ")) from exc
    except OSError as exc:
        reason = {
            errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only filesystem",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""
        raise StorageError(f"{action} failed: {reason}{where}") from exc
