"""The ASGI application of ``saga serve``: the API, the dashboard, ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from orchestrator.client import Orchestrator
from orchestrator.errors import OrchestratorError
from orchestrator.http.api import add_api
from orchestrator.http.polls import StatusPolls
from orchestrator.http.problems import engine_error, http_error, problem_media_type, validation_error
from orchestrator.http.security import (
    ASGIApp,
    BodyTooLarge,
    LimitBody,
    Message,
    Receive,
    RequireToken,
    Scope,
    Send,
    too_large,
)
from orchestrator.http.watch import Changes

log = structlog.get_logger("sagaworks.http")


class Health(BaseModel):
    """Whether the service can do its job: the database answers, and how far the projections lag."""

    status: str
    """``ok``, or ``unavailable`` when the database does not answer."""
    database: str
    projections: dict[str, dict[str, float]] = {}
    """Per projection: ``lag_events`` and ``lag_seconds`` behind the event log."""


def create_app(orch: Orchestrator) -> FastAPI:
    """The API and dashboard of ``orch``, opened when the app starts (whoever made ``orch`` closes it)."""
    changes = Changes(orch.repository)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        orch.open()
        changes.start()
        try:
            yield
        finally:
            changes.stop()

    app = FastAPI(
        title="sagaworks",
        summary="Durable sagas: start them, poll them, steer them.",
        version="0.2.0",
        lifespan=lifespan,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_media_type(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(OrchestratorError, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(BodyTooLarge, too_large)
    add_api(app.router, orch, changes)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}}, tags=["operations"])
    def healthz() -> Any:
        """The database answers (``200``) or not (``503``), and the projections' lag."""
        try:
            orch.repository.index.status_position()
        except Exception as error:  # the database is away: say so, do not fail the probe itself
            body = Health(status="unavailable", database=type(error).__name__)
            return JSONResponse(body.model_dump(), status_code=503)
        return Health(status="ok", database="ok", projections=orch.projection_lag())

    @app.get("/metrics", response_class=Response, tags=["operations"])
    def metrics() -> Response:
        """Prometheus metrics of this process (text exposition format)."""
        from orchestrator.metrics import exposition

        body, content_type = exposition(orch)
        return Response(body, media_type=content_type)

    from orchestrator.http.dashboard import dashboard_router

    app.include_router(dashboard_router(orch))
    # Each one added wraps the ones before: the plain polls innermost, the body limit, the token check
    # (before any body is read), then the access log around everything.
    app.add_middleware(StatusPolls, orch=orch)
    app.add_middleware(LimitBody, limit=orch.settings.max_body_bytes)
    token = orch.settings.api_token
    app.add_middleware(RequireToken, token=token.get_secret_value() if token else None)
    app.add_middleware(AccessLog)
    return app


class AccessLog:
    """ASGI middleware: one line per request with method, path, status and the time to the response's
    start; never the body, the query or a header. Plain ASGI, not ``app.middleware("http")``: that
    wraps every request in a task group and memory streams, which cost a quarter of a start's CPU."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers
        logged = False

        def line() -> None:
            nonlocal logged
            logged = True
            ms = round((time.perf_counter() - began) * 1000, 1)
            log.info("request", method=scope["method"], path=_path(scope), status=status, ms=ms)

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                line()
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            if not logged:
                line()


def _path(scope: Scope) -> str:
    """The request's path as ``Request.url.path`` gives it (the characters a URL cannot hold escaped)."""
    path: str = scope["path"]
    return path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
