"""Model serving: long-running inference services on cluster nodes.

Modules (one job each):
  codec         tensor wire formats (JSON, .npy) and input validation
  batching      dynamic batching of concurrent requests onto one worker thread
  model_loader  checkpoint + recipe -> nn.Module on the node's device
  auth          per-service bearer token (mode 0600 in the run directory)
  metrics       Prometheus metrics of a replica
  app           the FastAPI routes
  server        one replica's lifecycle (listen, load, warm up, READY, drain)
  endpoints     endpoint records in ``<run_dir>/endpoints/`` (discovery)
  client        Client / AsyncClient: discovery, round robin, retries
  loadgen       a lean asyncio HTTP load generator (benchmarks, ``aimass bench``)

``Client`` and ``AsyncClient`` are importable from here; they are loaded lazily so that
importing the package does not pull in FastAPI or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aimass_hpc.serve.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from aimass_hpc.serve import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
