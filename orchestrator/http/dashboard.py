"""The operator's dashboard (placeholder until the full page lands)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from orchestrator.client import Orchestrator


def dashboard_router(orch: Orchestrator) -> APIRouter:
    """The dashboard's routes."""
    router = APIRouter(include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    def index() -> str:
        return "<!doctype html><title>sagaworks</title><h1>sagaworks</h1>"

    return router
