"""What the dashboard's list APIs share: their paging query parameters, one page of rows,
and who owns a file (the file system's word, for what Slurm does not know)."""

import pwd
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Query

# The query parameters of every paged list API (``?q=...&page=2&page_size=50``).
Needle = Annotated[str, Query(max_length=200)]
PageNo = Annotated[int, Query(ge=1, le=1_000_000)]
PageSize = Annotated[int, Query(ge=1, le=500)]


class Paging:
    """A list API's ``q`` (a substring of the name or id), ``page`` and ``page_size``."""

    def __init__(self, q: Needle = "", page: PageNo = 1, page_size: PageSize = 50) -> None:
        self.q = q
        self.page = page
        self.page_size = page_size

    def of(self, rows: list[Any], **extra: Any) -> dict[str, Any]:
        """:func:`page_of` this page of ``rows``."""
        return page_of(rows, self.page, self.page_size, **extra)


# A route's parameter ``paging: Paged`` reads the three query parameters.
Paged = Annotated[Paging, Depends()]


def page_of(rows: list[Any], page: int, page_size: int, **extra: Any) -> dict[str, Any]:
    """``{"total", "page", "page_size", **extra, "rows"}``: page ``page`` (from 1) of ``rows``."""
    start = (page - 1) * page_size
    return {"total": len(rows), "page": page, "page_size": page_size, **extra,
            "rows": rows[start : start + page_size]}  # fmt: skip


def path_owner(path: Path) -> str | None:
    """The login name owning ``path``; None when it is gone or the uid has no name."""
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (OSError, KeyError):
        return None


__all__ = ["Needle", "PageNo", "PageSize", "Paged", "Paging", "page_of", "path_owner"]
