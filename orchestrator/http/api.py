"""The sagas over HTTP, as asynchronous request-reply: start -> 202 + Location, poll the status,
send events, cancel, retry; list, count, history, timeline and time travel."""

from __future__ import annotations

import inspect
import re
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import orjson
from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.client import Orchestrator
from orchestrator.definition import Saga
from orchestrator.domain import DomainEvent, EventInfo
from orchestrator.errors import InvalidInput, OrchestratorError, UnknownEvent, UnknownSaga
from orchestrator.http.problems import engine_error, responses
from orchestrator.http.security import ASGIApp, Receive, Scope, Send, token_matches, unauthorized
from orchestrator.http.watch import Changes
from orchestrator.readmodels.history import HistoryEvent
from orchestrator.readmodels.status import SagaStatus
from orchestrator.readmodels.timeline import TimelineEntry
from orchestrator.states import SagaState

RETRY_AFTER = "1"
"""Seconds a poller is told to wait before asking again about a saga that is not finished."""
MAX_WAIT = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+)")


class Started(BaseModel):
    """The answer to a start: the saga's id and where to poll it, send it events, cancel and retry it."""

    saga_id: str
    saga: str
    status_url: str
    events_url: str
    """A template: put the event's name in place of ``{event}``."""
    cancel_url: str
    retry_url: str
    history_url: str
    timeline_url: str


class SagaList(BaseModel):
    """A page of sagas and, if there are more, the cursor and URL of the next page."""

    items: list[SagaStatus]
    next_cursor: str | None = None
    next: str | None = None


class Counts(BaseModel):
    """How many sagas there are, by saga name and state."""

    counts: dict[str, dict[str, int]]
    total: int


class CancelRequest(BaseModel):
    """What a cancel asks for."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)
    compensate: bool = True
    """``false`` ends the saga where it stands, running nothing more (the way out of ``failed``)."""


def saga_url(saga_id: str, *rest: str) -> str:
    """The URL path of a saga (the id percent-encoded), or of one of its resources."""
    return "/".join([f"/sagas/{quote(saga_id, safe='')}", *rest])


def started(saga: str, saga_id: str) -> Started:
    url = saga_url(saga_id)
    return Started(
        saga_id=saga_id,
        saga=saga,
        status_url=url,
        events_url=f"{url}/events/{{event}}",
        cancel_url=f"{url}/cancel",
        retry_url=f"{url}/retry",
        history_url=f"{url}/history",
        timeline_url=f"{url}/timeline",
    )


def parse_search(items: list[str]) -> dict[str, Any]:
    """``field:value`` pairs; a value that reads as a JSON number or boolean is one, else it is text."""
    search: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition(":")
        if not sep:
            raise InvalidInput(f"search takes field:value, not {item[:60]!r}")
        try:
            value = orjson.loads(raw)
            search[name] = value if isinstance(value, bool | int | float) else raw
        except orjson.JSONDecodeError:
            search[name] = raw
    return search


def add_api(router: APIRouter, orch: Orchestrator, changes: Changes) -> None:
    """Add the routes of the API for ``orch`` to ``router`` (one start route per registered saga, typed
    by its input). Given the app's own router rather than included from one of their own: FastAPI
    matches an included router's routes twice, some 40 µs of every request."""
    token = orch.settings.api_token.get_secret_value() if orch.settings.api_token else None

    def guard(request: Request) -> Response | None:
        return None if token_matches(request, token) else unauthorized(request)

    for saga in orch.registry:
        _add_start(router, orch, saga, guard)

    @router.post(
        "/sagas/{name}", status_code=202, response_model=Started, responses=responses(401, 404), tags=["sagas"]
    )
    def start_unknown(name: str, request: Request) -> Any:
        """Start a saga of a name no saga is registered under: always ``404 unknown-saga``."""
        if (refused := guard(request)) is not None:
            return refused
        raise UnknownSaga(f"unknown saga {name[:60]!r}; registered sagas: {', '.join(sorted(orch.sagas)) or 'none'}")

    @router.get("/sagas", response_model=SagaList, responses=responses(404), tags=["sagas"])
    def list_sagas(
        request: Request,
        state: SagaState | None = None,
        saga: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        updated_after: datetime | None = None,
        updated_before: datetime | None = None,
        search: Annotated[list[str], Query(description="field:value; repeat for more fields")] = [],  # noqa: B006
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: str | None = None,
    ) -> Any:
        """Sagas, most recently updated first, filtered; keyset pages (``next_cursor``, ``Link: rel=next``)."""
        filters = {
            "created_after": created_after,
            "created_before": created_before,
            "updated_after": updated_after,
            "updated_before": updated_before,
            "search": parse_search(search),
        }
        page = orch.page(state, saga, limit=limit, cursor=cursor, **filters)
        nxt = None
        if page.next_cursor is not None:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
            nxt = f"/sagas?{urlencode([*params, ('cursor', page.next_cursor)])}"
        body = SagaList(items=page.items, next_cursor=page.next_cursor, next=nxt)
        response = Response(body.model_dump_json(), media_type="application/json")
        if nxt:
            response.headers["Link"] = f'<{nxt}>; rel="next"'
        return response

    @router.get("/sagas/counts", response_model=Counts, responses=responses(404), tags=["sagas"])
    def count_sagas(saga: str | None = None, state: SagaState | None = None) -> Counts:
        """How many sagas there are per saga name and state."""
        counts = orch.counts(state, saga)
        return Counts(counts=counts, total=sum(n for states in counts.values() for n in states.values()))

    @router.get(
        "/sagas/{saga_id:path}/history", response_model=list[HistoryEvent], responses=responses(404), tags=["sagas"]
    )
    def history(saga_id: str) -> list[HistoryEvent]:
        """The saga's events in order: the truth everything else is derived from."""
        return orch.history(saga_id)

    @router.get(
        "/sagas/{saga_id:path}/timeline", response_model=list[TimelineEntry], responses=responses(404), tags=["sagas"]
    )
    def timeline(saga_id: str) -> list[TimelineEntry]:
        """Every attempt of every step, compensation, wait and notification, with its timing."""
        return orch.timeline(saga_id)

    @router.get(
        "/sagas/{saga_id:path}",
        response_model=SagaStatus,
        responses={**responses(404), 202: {"model": SagaStatus, "description": "Not finished: poll again"}},
        tags=["sagas"],
    )
    async def get_status(
        saga_id: str,
        at: datetime | None = None,
        prefer: Annotated[str | None, Header(description="wait=N (N <= 60): wait up to N s for the end")] = None,
    ) -> Any:
        """The saga's status: ``200`` once it has ended, ``202`` (with ``Retry-After``) while it runs.

        ``at=TIME`` gives the status it had then. ``Prefer: wait=N`` holds the request until the
        saga ends or N seconds pass.
        """
        if at is not None:
            then = await run_in_threadpool(orch.status_at, saga_id, at)
            return _status_response(then, final=True)
        status = await run_in_threadpool(orch.status, saga_id)
        wait = _prefer_wait(prefer)
        if wait and not status.state.terminal:

            async def ended() -> SagaStatus | None:
                found = await run_in_threadpool(orch.status, saga_id)
                return found if found.state.terminal else None

            final = await changes.until(ended, wait)
            status = final if final is not None else await run_in_threadpool(orch.status, saga_id)
        response = _status_response(status, final=status.state.terminal)
        if wait:
            response.headers["Preference-Applied"] = f"wait={wait}"
        return response

    @router.post(
        "/sagas/{saga_id:path}/events/{event}",
        status_code=202,
        response_model=SagaStatus,
        responses=responses(401, 404, 409),
        tags=["sagas"],
    )
    def send(saga_id: str, event: str, request: Request, data: Annotated[dict[str, Any] | None, Body()] = None) -> Any:
        """Deliver an event the saga waits for (now or later in its plan); ``409`` if it does not."""
        if (refused := guard(request)) is not None:
            return refused
        orch.send(saga_id, event, data or {})
        return _status_response(orch.status(saga_id), final=False, code=202)

    @router.post(
        "/sagas/{saga_id:path}/cancel",
        status_code=202,
        response_model=SagaStatus,
        responses=responses(401, 404, 409),
        tags=["sagas"],
    )
    def cancel(saga_id: str, request: Request, body: Annotated[CancelRequest | None, Body()] = None) -> Any:
        """Cancel the saga: what it did is compensated (or, with ``compensate: false``, nothing more runs)."""
        if (refused := guard(request)) is not None:
            return refused
        body = body or CancelRequest()
        orch.cancel(saga_id, body.reason, compensate=body.compensate)
        return _status_response(orch.status(saga_id), final=False, code=202)

    @router.post(
        "/sagas/{saga_id:path}/retry",
        status_code=202,
        response_model=SagaStatus,
        responses=responses(401, 404, 409),
        tags=["sagas"],
    )
    def retry(saga_id: str, request: Request) -> Any:
        """Resume a failed saga's compensations."""
        if (refused := guard(request)) is not None:
            return refused
        orch.retry(saga_id)
        return _status_response(orch.status(saga_id), final=False, code=202)

    for event_type in orch.event_types.values():
        _add_emit(router, orch, event_type, guard)

    @router.post(
        "/events/{name}", status_code=202, response_model=Emitted, responses=responses(401, 404), tags=["events"]
    )
    def emit_unknown(name: str, request: Request) -> Any:
        """Record a domain event of a name no event type is known by: always ``404 unknown-event``."""
        if (refused := guard(request)) is not None:
            return refused
        raise UnknownEvent(f"unknown domain event {name[:60]!r}; known: {', '.join(sorted(orch.event_types))}")

    @router.get("/events", response_model=list[EventInfo], responses=responses(), tags=["events"])
    def list_events(
        name: str | None = None,
        after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[EventInfo]:
        """Domain events in the order they were recorded, with what the triggers did with each."""
        return orch.events(name, after=after, limit=limit)

    @router.get("/schedules", response_model=list[ScheduleInfo], responses=responses(), tags=["schedules"])
    def list_schedules() -> list[ScheduleInfo]:
        """Every schedule (deleted ones left out) with its definition, next fire time and last run."""
        return [ScheduleInfo.model_validate(row) for row in orch.scheduler.rows()]


class ScheduleRun(BaseModel):
    """One tick of a schedule: the saga it started, or why it started none."""

    tick: datetime
    saga_id: str | None = None
    skipped: str | None = None


class ScheduleInfo(BaseModel):
    """A schedule as its read model keeps it (what ``saga schedules list --json`` prints)."""

    schedule_id: str
    saga: str
    spec: dict[str, Any] = Field(description="cron, every or at; tz, input, policies (defaults left out)")
    paused: bool
    reason: str | None = Field(description="Why it was paused")
    declared: bool = Field(description="Declared in code next to the saga (not created at run time)")
    next_fire_at: datetime | None = Field(description="The next tick; none while paused or after the last")
    buffered: datetime | None = Field(description="A tick held back until the previous run ends (overlap 'buffer')")
    last_tick: datetime | None
    last_saga_id: str | None = Field(description="The saga the last tick started")
    runs: list[ScheduleRun] = Field(description="The last ten ticks dealt with, oldest first")
    version: int


class Emitted(BaseModel):
    """The answer to an emitted domain event: its id (a repeat of the same ``Idempotency-Key`` records nothing)."""

    event_id: str
    name: str


def _add_emit(router: APIRouter, orch: Orchestrator, event_type: type[DomainEvent], guard: Any) -> None:
    def emit(request: Request, data: Any, idempotency_key: str | None = None) -> Any:
        if (refused := guard(request)) is not None:
            return refused
        event_id = orch.emit(data, event_id=idempotency_key)
        return Response(
            Emitted(event_id=event_id, name=event_type.event_name).model_dump_json(),
            status_code=202,
            media_type="application/json",
        )

    emit.__doc__ = f"Record a {event_type.event_name} domain event: the sagas it triggers start soon after."
    emit.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
            inspect.Parameter(
                "data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[event_type, Body()]
            ),
            inspect.Parameter(
                "idempotency_key",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None,
                annotation=Annotated[str | None, Header(description="The event's id: a repeat records nothing")],
            ),
        ]
    )
    router.add_api_route(
        f"/events/{quote(event_type.event_name, safe='')}",
        emit,
        methods=["POST"],
        status_code=202,
        response_model=Emitted,
        responses=responses(401, 422),
        name=f"emit_{event_type.event_name}",
        tags=["events"],
    )


def _add_start(router: APIRouter, orch: Orchestrator, saga: type[Saga[Any]], guard: Any) -> None:
    model = saga.input_model

    async def start(
        request: Request, data: Any, idempotency_key: str | None = None, callback_url: str | None = None
    ) -> Any:
        if (refused := guard(request)) is not None:
            return refused
        # On the event loop, not in a thread per request: the commit is shared with the starts that
        # arrive meanwhile and written in the group's own thread.
        saga_id = await orch.start_async(saga, data, saga_id=idempotency_key, notify=callback_url)
        body = started(saga.name, saga_id)
        return Response(
            body.model_dump_json(),
            status_code=202,
            media_type="application/json",
            headers={"Location": body.status_url, "Retry-After": RETRY_AFTER},
        )

    start.__doc__ = f"Start a {saga.name} saga: ``202 Accepted`` with ``Location`` to poll."
    # The body's type is this saga's input model, known only now: the signature says so to FastAPI.
    start.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
            inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[model, Body()]),
            inspect.Parameter(
                "idempotency_key",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None,
                annotation=Annotated[str | None, Header(description="The saga id: a repeat starts nothing")],
            ),
            inspect.Parameter(
                "callback_url",
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None,
                annotation=Annotated[str | None, Header(description="POST the final status here when it ends")],
            ),
        ]
    )
    router.add_api_route(
        f"/sagas/{quote(saga.name, safe='')}",
        start,
        methods=["POST"],
        status_code=202,
        response_model=Started,
        responses=responses(401, 409),
        name=f"start_{saga.name}",
        tags=["sagas"],
    )


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
            response = _status_response(status, final=status.state.terminal)
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


def _prefer_wait(prefer: str | None) -> int:
    found = _PREFER_WAIT.search(prefer or "")
    return min(int(found.group(1)), MAX_WAIT) if found else 0


def _status_response(status: SagaStatus, *, final: bool, code: int | None = None) -> Response:
    done = status.state.terminal
    response = Response(
        status.model_dump_json(), status_code=code or (200 if done or final else 202), media_type="application/json"
    )
    if not done:
        response.headers["Retry-After"] = RETRY_AFTER
    return response
