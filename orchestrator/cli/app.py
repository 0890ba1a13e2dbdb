"""Which ``Orchestrator`` a command works on: ``--app module:attribute`` (or ``SAGA_APP``)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from orchestrator.client import Orchestrator
from orchestrator.safety import short

APP_HINT = "--app module:attribute (or SAGA_APP) naming your Orchestrator; the examples are --app sagas:app"


def load_app(spec: str) -> Orchestrator:
    """The orchestrator named by ``module:attribute`` (an Orchestrator, or a function returning one).

    The working directory is importable, as it is for uvicorn and celery.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected module:attribute, got {short(spec)}", param_hint="--app")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise click.BadParameter(f"cannot load {short(spec)}: {error}", param_hint="--app") from error
    orch: Any = target() if callable(target) and not isinstance(target, Orchestrator) else target
    if not isinstance(orch, Orchestrator):
        raise click.BadParameter(f"{short(spec)} is not an Orchestrator (got {short(orch)})", param_hint="--app")
    return orch


app_option = click.option(
    "--app",
    "app_spec",
    envvar="SAGA_APP",
    default=None,
    help="module:attribute of the Orchestrator, or of a function returning one (env SAGA_APP).",
)


def app_of(ctx: click.Context, spec: str | None, *, opened: bool = True) -> Orchestrator:
    """The orchestrator of this invocation (opened unless told not), closed when the command ends."""
    if not spec:
        raise click.UsageError(f"saga {ctx.info_name} needs {APP_HINT}")
    orch = load_app(spec)
    if not orch.database.durable:
        raise click.UsageError(
            "memory:// keeps nothing once this command exits, and no other process can see it; "
            "use SAGA_DATABASE_URL=sqlite:///sagaworks.db or a postgresql:// URL (memory:// suits tests and saga demo)"
        )
    ctx.call_on_close(orch.close)
    return orch.open() if opened else orch
