"""Errors as RFC 9457 problem documents: ``application/problem+json`` naming what went wrong.

Every engine error maps to one problem type and status; nothing is written by a request that
gets one (the engine checks before it writes).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from orchestrator.errors import (
    ConfigurationError,
    InvalidInput,
    InvalidTransition,
    OrchestratorError,
    SagaAlreadyStarted,
    SagaNotFound,
    StorageError,
    StorageUnavailable,
    UnexpectedEvent,
    UnknownEvent,
    UnknownSaga,
)
from orchestrator.safety import clean_error

PROBLEM = "application/problem+json"


class FieldError(BaseModel):
    """One field of a request that failed validation."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    model_config = ConfigDict(extra="allow")

    type: str
    """A URI reference naming the kind of problem, e.g. ``/problems/invalid-input``."""
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None
    """For ``invalid-input``: the fields that failed the saga's input model."""


# Engine error -> (status, problem slug, title); the first matching class wins.
ERRORS: list[tuple[type[Exception], int, str, str]] = [
    (UnknownSaga, 404, "unknown-saga", "No saga of that name is registered"),
    (UnknownEvent, 404, "unknown-event", "No domain event of that name is known"),
    (SagaNotFound, 404, "saga-not-found", "No saga with that id"),
    (SagaAlreadyStarted, 409, "saga-already-started", "That saga id was used with other input"),
    (UnexpectedEvent, 409, "unexpected-event", "The saga does not wait for that event"),
    (InvalidTransition, 409, "invalid-transition", "The saga's state does not allow that"),
    (InvalidInput, 422, "invalid-input", "The request's data is not valid"),
    (StorageUnavailable, 503, "storage-unavailable", "The database is unavailable; try again later"),
    (StorageError, 500, "storage-error", "The database refused the operation"),
    (ConfigurationError, 500, "configuration-error", "The server is misconfigured"),
    (OrchestratorError, 500, "orchestrator-error", "The orchestrator failed"),
]

# Responses every route may give, for the OpenAPI document.
COMMON: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM: {}}, "description": title}
    for status, title in [(400, "Bad request"), (413, "Body too large"), (422, "Invalid data"), (503, "Unavailable")]
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a route: its problem statuses and the common ones."""
    titles = {404: "Not found", 409: "Conflict", 401: "Token missing or wrong", 500: "Server error"}
    extra: dict[int | str, dict[str, Any]] = {
        s: {"model": Problem, "content": {PROBLEM: {}}, "description": titles.get(s, "Problem")} for s in statuses
    }
    return {**COMMON, **extra}


def problem_media_type(openapi: dict[str, Any]) -> dict[str, Any]:
    """``openapi`` with each problem response's schema under ``application/problem+json``, the type
    these responses have (FastAPI puts a response model's schema under ``application/json``)."""
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if PROBLEM in content and "schema" in content.get("application/json", {}):
                    response["content"] = {PROBLEM: content["application/json"]}
    return openapi


def problem(status: int, slug: str, title: str, detail: str | None, request: Request, **extra: Any) -> JSONResponse:
    """A problem response."""
    body = Problem(
        type=f"/problems/{slug}",
        title=title,
        status=status,
        detail=None if detail is None else clean_error(detail),
        instance=request.url.path,
        **extra,
    )
    headers = {"Retry-After": "5"} if status == 503 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM, headers=headers)


async def engine_error(request: Request, error: Exception) -> JSONResponse:
    """An engine error as its problem document."""
    for cls, status, slug, title in ERRORS:
        if isinstance(error, cls):
            return problem(status, slug, title, str(error), request)
    raise error  # pragma: no cover - registered for OrchestratorError only


async def validation_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's request validation: invalid JSON (400) or data that fails the model (422)."""
    assert isinstance(error, RequestValidationError)
    details = list(error.errors())
    invalid = [d for d in details if d.get("type") == "json_invalid"]
    if invalid:
        reason = (invalid[0].get("ctx") or {}).get("error", "JSON decode error")
        return problem(
            400, "invalid-json", "The body is not valid JSON", f"the body is not valid JSON: {reason}", request
        )
    fields = [
        FieldError(
            loc=[p for p in d.get("loc", ()) if isinstance(p, str | int)],
            msg=clean_error(str(d.get("msg", ""))),
            type=str(d.get("type", "")),
        )
        for d in details
    ]
    return problem(
        422, "invalid-input", "The request's data is not valid", _first_message(details), request, errors=fields
    )


async def http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own errors (no such route, method not allowed) as problems too."""
    assert isinstance(error, HTTPException)
    slug = {404: "not-found", 405: "method-not-allowed"}.get(error.status_code, "http-error")
    response = problem(error.status_code, slug, str(error.detail), None, request)
    response.headers.update(error.headers or {})
    return response


def _first_message(details: list[Any]) -> str:
    if not details:
        return "invalid request"
    first = details[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
