"""ASGI middleware loaded *into vLLM's API server* (``--middleware aimass_vllm_readyz.Readyz``).

It gives a vLLM replica the same health routes as the built-in server, so ``aimass endpoints``,
the client and the supervisor probe both engines alike: ``GET /readyz`` and ``GET /healthz``
answer as vLLM's ``/health`` does (200 once the engine is up), and ``/readyz`` turns 503
``{"phase": "draining"}`` once the file named by ``$AIMASS_VLLM_DRAIN_FILE`` exists (the replica
wrapper writes it when it starts draining). A request that meets the engine already stopping
(a scancel signals vLLM together with the replica) gets 503, which clients retry elsewhere,
instead of vLLM's 500.

The file runs in vLLM's environment, where ``aimass_hpc`` is not installed: the wrapper
(:mod:`aimass_hpc.serve.vllm_replica`) copies it as ``aimass_vllm_readyz.py`` next to the
model and puts that folder on vLLM's ``PYTHONPATH``. It imports nothing but the standard
library.
"""

from __future__ import annotations

import os
from typing import Any

DRAIN_FILE_ENV = "AIMASS_VLLM_DRAIN_FILE"
_DRAINING = b'{"phase": "draining"}'
_STOPPING = b'{"detail": "this replica is stopping: ask another one"}'


def _engine_stopping(exc: BaseException) -> bool:
    """Whether ``exc`` says vLLM's engine is gone or shutting down (not a bad request).

    A scancel's SIGTERM reaches vLLM together with the replica; a request that arrives in that
    instant meets ``EngineDeadError`` or an executor that no longer takes work.
    """
    return type(exc).__name__ == "EngineDeadError" or (
        isinstance(exc, RuntimeError) and "after shutdown" in str(exc)
    )


class Readyz:
    """Map ``/readyz`` and ``/healthz`` to ``/health``; ``/readyz`` is 503 while draining."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.drain_file = os.environ.get(DRAIN_FILE_ENV)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path")
        if scope.get("type") == "http" and path in ("/readyz", "/healthz"):
            if path == "/readyz" and self.drain_file and os.path.exists(self.drain_file):
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_DRAINING)).encode()),
                ]
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": _DRAINING})
                return
            scope = {**scope, "path": "/health", "raw_path": b"/health"}
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started or not _engine_stopping(exc):
                raise
            # Unanswered, and the engine is stopping: 503, which clients retry elsewhere
            # (a 500 would reach the user as a failed request).
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_STOPPING)).encode()),
                (b"retry-after", b"1"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": _STOPPING})
