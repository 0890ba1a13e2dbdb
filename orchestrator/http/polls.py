"""The API's hottest request, a plain status poll, answered before FastAPI's routing."""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from orchestrator.client import Orchestrator
from orchestrator.errors import OrchestratorError
from orchestrator.http.api import status_response
from orchestrator.http.problems import engine_error
from orchestrator.http.security import ASGIApp, Receive, Scope, Send


class StatusPolls:
    """ASGI middleware for the API's hottest request, a plain poll: ``GET /sagas/{id}`` with no query
    and no ``Prefer``. It answers as the ``get_status`` route does, without FastAPI's routing and
    parameter solving (some 80 µs, a sixth of such a poll's CPU); every other request passes on."""

    def __init__(self, app: ASGIApp, orch: Orchestrator) -> None:
        self.app = app
        self.orch = orch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        saga_id = _plain_poll(scope)
        if saga_id is None:
            await self.app(scope, receive, send)
            return
        response: Response
        try:
            # In a worker thread, as the route reads it: on the event loop the read's round trips would
            # hold up every other request (tried: fewer polls per second and a worse p99).
            status = await run_in_threadpool(self.orch.status, saga_id)
        except OrchestratorError as error:  # what the app's handler for these answers
            response = await engine_error(Request(scope, receive), error)
        else:
            response = status_response(status, final=status.state.terminal)
        await response(scope, receive, send)


def _plain_poll(scope: Scope) -> str | None:
    """The saga id when the app would route the request to ``get_status`` with no ``at`` and no
    ``Prefer``, else ``None`` (when in doubt: the app then routes it itself)."""
    if scope["type"] != "http" or scope["method"] != "GET" or scope.get("query_string") or scope.get("root_path"):
        return None
    path: str = scope["path"]
    # The routes matched before get_status's /sagas/{saga_id:path}: the counts, a history, a timeline.
    if not path.startswith("/sagas/") or path == "/sagas/counts" or path.endswith(("/history", "/timeline")):
        return None
    if any(name.lower() == b"prefer" for name, _ in scope["headers"]):
        return None
    return path.removeprefix("/sagas/")
