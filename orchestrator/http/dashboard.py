"""The operator's dashboard: server-rendered pages (Jinja2, autoescaped) that htmx keeps fresh.

The pages read through the ``Orchestrator`` like any other caller. Their buttons call the JSON
API from the browser (``POST /sagas/{id}/cancel``, ``/retry``, ``/events/{event}``) with the
bearer token the operator typed, which stays in the tab's ``sessionStorage``: never in a URL,
a cookie or a page. Every asset is served from this package, so the dashboard works offline.

Routes (none in the OpenAPI document): ``/`` (counts and the saga list, filtered and paged by
its query string), ``/ui/sagas/{id}`` (one saga: status, timeline, history, actions),
``/ui/schedules`` (every schedule with its next fire time and last runs), the partials htmx
polls (``/ui/partials/...``) and ``/static/{name}``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from orchestrator.client import Orchestrator
from orchestrator.errors import InvalidInput, OrchestratorError, SagaNotFound, UnknownSaga
from orchestrator.http.models import saga_url
from orchestrator.http.problems import ERRORS
from orchestrator.http.views import (
    ACTIVE,
    FAST_POLL,
    SLOW_POLL,
    STATES,
    STEERABLE,
    Listing,
    cancel_question,
    clock,
    compact,
    duration,
    pretty,
    schedule_view,
    since,
    slug,
    timeline_view,
    tone,
    ui_url,
    when,
)
from orchestrator.readmodels.history import HistoryEvent
from orchestrator.readmodels.timeline import TimelineEntry
from orchestrator.states import SagaState, StepState

HERE = Path(__file__).parent
STATIC = HERE / "static"
ASSETS = {
    "htmx.min.js": "text/javascript",
    "htmx.LICENSE": "text/plain",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
"""The files ``/static/`` serves, and their media types: nothing else is reachable there."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
"""Headers of every page: only this origin's scripts and styles, no framing."""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, ui_url=ui_url, api_url=saga_url, pretty=pretty, compact=compact, slug=slug)
    env.filters.update(tone=tone, duration=duration, clock=clock, quoted=lambda text: quote(text, safe=""))
    version = hashlib.sha256(b"".join((STATIC / name).read_bytes() for name in sorted(ASSETS))).hexdigest()[:12]
    env.globals["asset"] = lambda name: f"/static/{name}?v={version}"
    env.globals["states"] = STATES
    return env


def dashboard_router(orch: Orchestrator) -> APIRouter:
    """The dashboard's routes."""
    router = APIRouter(include_in_schema=False)
    env = _environment()
    env.globals["token_required"] = orch.settings.api_token is not None

    def render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    def failure(error: OrchestratorError) -> HTMLResponse:
        code, title = next((status, title) for cls, status, _, title in ERRORS if isinstance(error, cls))
        return render("error.html", code, title=title, detail=str(error))

    def overview() -> dict[str, Any]:
        counts = orch.counts()
        totals = {state: sum(by_state.get(state, 0) for by_state in counts.values()) for state in STATES}
        unfinished = sum(totals[state.value] for state in ACTIVE)
        return {
            "counts": sorted(counts.items()),
            "totals": totals,
            "total": sum(totals.values()),
            "poll": FAST_POLL if unfinished else SLOW_POLL,
        }

    def listing_context(listing: Listing) -> tuple[dict[str, Any], int]:
        context: dict[str, Any] = {"listing": listing, "sagas": [], "next_url": None, "error": None}
        context.update(overview())
        try:
            page = orch.page(
                listing.state or None,
                listing.saga or None,
                limit=listing.page_size(),
                cursor=listing.cursor or None,
                **listing.filters(),
            )
        except (InvalidInput, UnknownSaga) as error:
            context["error"] = str(error)
            return context, 400
        context["sagas"] = page.items
        if page.next_cursor:
            context["next_url"] = "/?" + listing.query(page.next_cursor)
        return context, 200

    @router.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        listing = Listing.parse(request)
        if listing.noisy:  # a submitted form: the same filters, without its empty fields
            query = listing.query(listing.cursor)
            return RedirectResponse("/?" + query if query else "/", status_code=303)
        try:
            context, code = listing_context(listing)
        except OrchestratorError as error:
            return failure(error)
        names = sorted(orch.sagas)
        return render("index.html", code, names=names, oob=False, **context)

    @router.get("/ui/partials/sagas", response_class=HTMLResponse)
    def sagas_partial(request: Request) -> Response:
        try:
            context, code = listing_context(Listing.parse(request))
        except OrchestratorError as error:
            return failure(error)
        return render("_sagas.html", code, oob=True, **context)

    def saga_context(saga_id: str) -> dict[str, Any]:
        status = orch.status(saga_id)
        history: list[HistoryEvent] = []
        entries: list[TimelineEntry] = []
        unreadable = None
        try:
            history = orch.history(saga_id)
            entries = orch.timeline(saga_id)
        except OrchestratorError as error:  # a saga set aside: its status still shows
            unreadable = str(error)
        started = history[0].data if history and history[0].type == "SagaStarted" else {}
        plan: list[dict[str, Any]] = started.get("plan") or []
        compensable = {node.get("name") for node in plan if node.get("compensable")}
        events = {node.get("name"): node.get("event") for node in plan if node.get("kind") == "wait"}
        undo = [s.name for s in reversed(status.steps) if s.state is StepState.SUCCEEDED and s.name in compensable]
        running = [s.name for s in status.steps if s.state is StepState.RUNNING and s.name in compensable]
        expected = [
            str(events[s.name])
            for s in status.steps
            if s.name in events and s.state in (StepState.PENDING, StepState.RUNNING)
        ]
        now = datetime.now(UTC)
        question = cancel_question(saga_id, undo, running)
        first = history[0].timestamp if history else status.created_at
        return {
            "saga_id": saga_id,
            "status": status,
            "terminal": status.state.terminal,
            "history": history,
            "since": [since(h.timestamp - first) for h in history],
            "timeline": timeline_view(entries, status, now),
            "unreadable": unreadable,
            "input": started.get("input"),
            "undo": undo,
            "cancel_question": question,
            "expected": expected,
            "default_event": status.waiting_for or (expected[0] if expected else ""),
            # The API's routes take the id as one path segment: an id with "/" cannot be reached there.
            "can_cancel": status.state in STEERABLE,
            "can_send": status.state in STEERABLE,
            "can_retry": status.state is SagaState.FAILED,
            "age": duration(
                max(((status.updated_at if status.state.terminal else now) - status.created_at).total_seconds(), 0)
            ),
        }

    @router.get("/ui/sagas/{saga_id:path}", response_class=HTMLResponse)
    def saga_page(saga_id: str) -> Response:
        try:
            return render("saga.html", oob=False, oob_actions=False, **saga_context(saga_id))
        except SagaNotFound as error:
            return render("error.html", 404, title="No saga with that id", detail=str(error))
        except OrchestratorError as error:
            return failure(error)

    @router.get("/ui/partials/saga/{saga_id:path}", response_class=HTMLResponse)
    def saga_partial(saga_id: str, actions_for: str = "") -> Response:
        try:
            context = saga_context(saga_id)
        except OrchestratorError as error:
            return failure(error)
        # The actions panel is re-rendered (out of band) only when the state changed, so that
        # what the operator is typing there survives the refreshes.
        return render("_live.html", oob=False, oob_actions=actions_for != context["status"].state.value, **context)

    def schedules_context() -> dict[str, Any]:
        now = datetime.now(UTC)
        views = []
        for row in orch.scheduler.rows():
            last = None
            if row["last_saga_id"]:
                try:
                    last = orch.status(row["last_saga_id"])
                except SagaNotFound:  # purged since by retention
                    last = None
            views.append(schedule_view(row, last, now))
        return {"schedules": views, "poll": SLOW_POLL}

    @router.get("/ui/schedules", response_class=HTMLResponse)
    def schedules_page() -> Response:
        try:
            return render("schedules.html", **schedules_context())
        except OrchestratorError as error:
            return failure(error)

    @router.get("/ui/partials/schedules", response_class=HTMLResponse)
    def schedules_partial() -> Response:
        try:
            return render("_schedules.html", **schedules_context())
        except OrchestratorError as error:
            return failure(error)

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, "Not Found")
        headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
        return FileResponse(STATIC / name, media_type=media_type, headers=headers)

    return router
