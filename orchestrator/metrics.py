"""Prometheus metrics: what the engine counts and times, exposed by ``saga serve`` and by workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

if TYPE_CHECKING:
    from orchestrator.client import Orchestrator


def exposition(orch: Orchestrator) -> tuple[bytes, str]:
    """The metrics of this process in the text exposition format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
