"""Who may change sagas over HTTP (a bearer token, when one is set) and how much a request may send."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from orchestrator.http.problems import problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was being read. An ``HTTPException``, so that
    FastAPI's body parsing passes it on (any other error there becomes ``400``) to ``too_large``."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body may have at most {limit:,} bytes (SAGA_MAX_BODY_BYTES)")


async def too_large(request: Request, error: Exception) -> JSONResponse:
    """The problem a body over the limit gets, however far it was read."""
    assert isinstance(error, BodyTooLarge)
    return problem(413, "body-too-large", "The request body is too large", error.detail, request)


def token_matches(request: Request, token: str | None) -> bool:
    """Whether the request carries the bearer token (always, when none is set); constant-time."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Starlette decodes header bytes as latin-1: encoded back, they are the bytes the client sent.
    sent = given.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, token.encode())


def unauthorized(request: Request) -> JSONResponse:
    """The problem a change without the right token gets."""
    return problem(
        401, "unauthorized", "A bearer token is required", "send Authorization: Bearer <SAGA_API_TOKEN>", request
    )


class RequireToken:
    """ASGI middleware: with a token set, a change to ``/sagas...`` (any method but GET, HEAD and
    OPTIONS) without it gets 401 before its body is read, so no stranger's body is parsed or judged."""

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            self.token is not None
            and scope["type"] == "http"
            and scope["method"] not in self.SAFE
            and path.split("/")[1:2] in (["sagas"], ["events"])
        ):
            request = Request(scope, receive)
            if not token_matches(request, self.token):
                await unauthorized(request)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """ASGI middleware that refuses bodies over ``limit`` bytes with 413, before they are read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge as error:  # read outside the app's exception handlers
            await self._refuse(scope, receive, send, error)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: BodyTooLarge | None = None) -> None:
        response = await too_large(Request(scope, receive), error or BodyTooLarge(self.limit))
        await response(scope, receive, send)
