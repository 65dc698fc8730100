"""The dashboard's Cluster page: partitions, nodes with CPU/GPU allocation, reservations and
the viewer's fair share (read by :mod:`aimass_hpc.launch.cluster_info`)."""

# No "from __future__ import annotations" (FastAPI resolves the Annotated aliases).
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from aimass_hpc.common.errors import InputError
from aimass_hpc.launch import cluster_info

if TYPE_CHECKING:
    from aimass_hpc.dashboard.app import Ctx


def add_routes(app: FastAPI, ctx: "Ctx") -> None:
    """Add the Cluster page and its API to ``app``."""
    Reader = ctx.reader

    @app.get("/cluster", include_in_schema=False)
    def cluster_page(request: Request) -> Response:
        return ctx.page("cluster.html", request, page_name="cluster")

    @app.get("/api/cluster")
    def cluster_overview(
        _: Reader,  # type: ignore[valid-type]
        fairshare: bool = True,
    ) -> dict[str, Any]:
        """Partitions, nodes (CPUs and GPUs allocated of total), reservations and, unless
        ``fairshare=false``, the viewer's fair share (sshare)."""
        if ctx.site.scheduler != "slurm":
            raise InputError(f"site {ctx.site.name}: the Cluster page needs a Slurm site")
        return cluster_info.overview(ctx.viewer, fairshare=fairshare)
