"""Who may change sagas over HTTP (a bearer token, when one is set) and how much a request may send."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from orchestrator.http.problems import problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body passed the limit while it was being read."""


def token_matches(request: Request, token: str | None) -> bool:
    """Whether the request carries the bearer token (always, when none is set); constant-time."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def unauthorized(request: Request) -> JSONResponse:
    """The problem a change without the right token gets."""
    return problem(
        401, "unauthorized", "A bearer token is required", "send Authorization: Bearer <SAGA_API_TOKEN>", request
    )


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
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        detail = f"the body may have at most {self.limit:,} bytes (SAGA_MAX_BODY_BYTES)"
        response = problem(413, "body-too-large", "The request body is too large", detail, request)
        await response(scope, receive, send)
