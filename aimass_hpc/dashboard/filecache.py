"""Parsed files kept between requests while they stay the same.

A list API reads the ``state.json`` of every run (and the metrics of a page of them) on each
poll; almost none changed since the last one. A file is parsed again only when its
``(mtime_ns, size, inode)`` differs (an atomic replace changes the inode, an append the size).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class FileCache(Generic[T]):
    """``get(path, parse)``: ``parse()``'s value for ``path``, parsed again only after the
    file changed. Errors (a missing file: FileNotFoundError) pass and are not kept."""

    def __init__(self) -> None:
        self._data: dict[Path, tuple[tuple[int, int, int], T]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, parse: Callable[[], T]) -> T:
        """The parsed content of ``path`` (stat first: a change after it is seen next time)."""
        st = os.stat(path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            hit = self._data.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = parse()
        with self._lock:
            self._data[path] = (key, value)
        return value

    def keep(self, dirs: set[Path]) -> None:
        """Forget every file that is not directly in one of ``dirs`` (runs removed since)."""
        with self._lock:
            for path in [p for p in self._data if p.parent not in dirs]:
                del self._data[path]


__all__ = ["FileCache"]
