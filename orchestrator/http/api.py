"""The sagas over HTTP, as asynchronous request-reply: start -> 202 + Location, poll the status,
send events, cancel, retry; list, count, history, timeline and time travel."""

from __future__ import annotations

import inspect
import re
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from orchestrator.client import Orchestrator
from orchestrator.definition import Saga
from orchestrator.domain import DomainEvent, EventInfo
from orchestrator.errors import UnknownEvent, UnknownSaga
from orchestrator.http.models import (
    CancelRequest,
    Counts,
    Emitted,
    SagaList,
    ScheduleInfo,
    Started,
    parse_search,
    started,
)
from orchestrator.http.problems import responses
from orchestrator.http.security import token_matches, unauthorized
from orchestrator.http.watch import Changes
from orchestrator.readmodels.history import HistoryEvent
from orchestrator.readmodels.status import SagaStatus
from orchestrator.readmodels.timeline import TimelineEntry
from orchestrator.states import SagaState

RETRY_AFTER = "1"
"""Seconds a poller is told to wait before asking again about a saga that is not finished."""
MAX_WAIT = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+)")


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
            return status_response(then, final=True)
        status = await run_in_threadpool(orch.status, saga_id)
        wait = _prefer_wait(prefer)
        if wait and not status.state.terminal:

            async def ended() -> SagaStatus | None:
                found = await run_in_threadpool(orch.status, saga_id)
                return found if found.state.terminal else None

            final = await changes.until(ended, wait)
            status = final if final is not None else await run_in_threadpool(orch.status, saga_id)
        response = status_response(status, final=status.state.terminal)
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
        return status_response(orch.status(saga_id), final=False, code=202)

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
        return status_response(orch.status(saga_id), final=False, code=202)

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
        return status_response(orch.status(saga_id), final=False, code=202)

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
    emit.__signature__ = _signature(  # type: ignore[attr-defined]
        event_type, idempotency_key="The event's id: a repeat records nothing"
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
    start.__signature__ = _signature(  # type: ignore[attr-defined]
        model,
        idempotency_key="The saga id: a repeat starts nothing",
        callback_url="POST the final status here when it ends",
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


def _signature(body: Any, **headers: str) -> inspect.Signature:
    """What a generated route says to FastAPI: the request, a JSON body of type ``body`` (a model
    known only when the route is made), then optional headers by parameter name, with their help."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(
        [
            inspect.Parameter("request", kind, annotation=Request),
            inspect.Parameter("data", kind, annotation=Annotated[body, Body()]),
            *(
                inspect.Parameter(name, kind, default=None, annotation=Annotated[str | None, Header(description=help)])
                for name, help in headers.items()
            ),
        ]
    )


def _prefer_wait(prefer: str | None) -> int:
    found = _PREFER_WAIT.search(prefer or "")
    return min(int(found.group(1)), MAX_WAIT) if found else 0


def status_response(status: SagaStatus, *, final: bool, code: int | None = None) -> Response:
    done = status.state.terminal
    response = Response(
        status.model_dump_json(), status_code=code or (200 if done or final else 202), media_type="application/json"
    )
    if not done:
        response.headers["Retry-After"] = RETRY_AFTER
    return response
