"""The ``saga`` command line: run workers and the demo, start and steer sagas, read their state."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from eventsourcing.persistence import PersistenceError
from pydantic import ValidationError

from orchestrator.app import Orchestrator
from orchestrator.errors import OrchestratorError
from orchestrator.logging import configure_logging
from orchestrator.safety import escape, short
from orchestrator.settings import LOG_LEVELS, Settings
from orchestrator.status import SagaStatus

DEFAULT_APP = "sagas:app"


class Group(click.Group):
    """Turns the engine's errors into one clear line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OrchestratorError, TimeoutError, ValidationError) as error:
            click.echo(f"error: {escape(' '.join(str(error).split()))}", err=True)
            sys.exit(1)
        except PersistenceError as error:  # a database error no command translated
            click.echo(f"error: database error: {escape(' '.join(str(error).split()))}", err=True)
            sys.exit(1)


def echo(text: str) -> None:
    """Print ``text`` with its control characters escaped (ids and errors come from anyone)."""
    click.echo(escape(text))


_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def echo_json(text: str) -> None:
    """Print a JSON document; characters a terminal would act on are written as ``\\uXXXX``."""
    click.echo(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


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


def read_json_argument(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object given inline, as ``@path`` (a file) or as ``-`` (standard input)."""
    if text is None:
        return {}
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise click.BadParameter(f"cannot read {short(text[1:])}: {error}", param_hint=what) from error
    return parse_json(text, what)


def parse_json(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from the command line."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint=what) from error
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=what)
    return value


def status_table(statuses: Sequence[SagaStatus]) -> str:
    """A plain-text table of sagas, one line each."""
    rows = [("SAGA ID", "SAGA", "STATE", "STEP", "ATTEMPTS", "UPDATED", "ERROR")]
    for s in statuses:
        rows.append(
            (
                _cell(s.saga_id, 60),
                _cell(s.saga, 40),
                s.state.value,
                _cell(s.current_step or "-", 40),
                str(sum(step.attempts + step.compensation_attempts for step in s.steps)),
                s.updated_at.strftime("%H:%M:%S"),
                _cell(s.problem or s.error or "", 90),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ).rstrip()


def _cell(text: str, width: int) -> str:
    text = escape(text)
    return text if len(text) <= width else text[: width - 1] + "…"


app_option = click.option(
    "--app",
    "app_spec",
    envvar="SAGA_APP",
    default=DEFAULT_APP,
    show_default=True,
    help="module:attribute of the Orchestrator, or of a function returning one (env SAGA_APP).",
)


@click.group(cls=Group)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="Lowest level logged (default: SAGA_LOG_LEVEL or info).",
)
@click.option("--json-logs/--console-logs", default=None, help="Log format (default: JSON unless on a terminal).")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, json_logs: bool | None) -> None:
    """sagaworks: durable sagas on event sourcing."""
    settings = Settings.from_env()
    configure_logging(
        json=settings.log_json if json_logs is None else json_logs,
        level=(log_level or settings.log_level).lower(),
    )


def app_of(ctx: click.Context, spec: str) -> Orchestrator:
    """The orchestrator of this invocation, opened, and closed when the command ends."""
    orch = load_app(spec)
    if not orch.database.durable:
        raise click.UsageError(
            "memory:// keeps nothing once this command exits, and no other process can see it; "
            "use SAGA_DATABASE_URL=sqlite:///sagaworks.db or a postgresql:// URL (memory:// suits tests and saga demo)"
        )
    ctx.call_on_close(orch.close)
    return orch.open()


@cli.command()
@click.option("--concurrency", type=click.IntRange(1), default=None, help="Attempts run at once.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Sagas claimed per transaction.")
@click.option("--drain", is_flag=True, help="Run what is runnable now, then exit.")
@app_option
@click.pass_context
def worker(ctx: click.Context, app_spec: str, concurrency: int | None, batch_size: int | None, drain: bool) -> None:
    """Run a worker until SIGTERM/SIGINT; it then finishes the attempts in hand and exits."""
    orch = load_app(app_spec)
    if not orch.database.durable:
        app_of(ctx, app_spec)  # refuses, with the hint
    ctx.call_on_close(orch.close)
    # The worker opens storage itself, waiting with backoff while the database is away.
    if orch.run_worker(wait=not drain, concurrency=concurrency, batch_size=batch_size):
        # Hung steps whose threads never returned: the interpreter would wait for them at exit,
        # forever; their leases hand the attempts to other workers.
        orch.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@cli.command()
@click.argument("saga")
@click.option(
    "--input",
    "input_json",
    required=True,
    help="The saga's input as a JSON object; @path reads it from a file, - from standard input.",
)
@click.option("--id", "saga_id", default=None, help="Saga id (the idempotency key); default: a new one.")
@click.option(
    "--at",
    "start_at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"]),
    default=None,
    help="Start later, at this timezone-aware time (e.g. 2026-12-01T09:00:00+00:00).",
)
@app_option
@click.pass_context
def start(
    ctx: click.Context, app_spec: str, saga: str, input_json: str, saga_id: str | None, start_at: datetime | None
) -> None:
    """Start a saga and print its id."""
    data = read_json_argument(input_json, "--input")
    echo(app_of(ctx, app_spec).start(saga, data, saga_id=saga_id, start_at=start_at))


@cli.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def status(ctx: click.Context, app_spec: str, saga_id: str) -> None:
    """Print a saga's status as JSON."""
    echo_json(app_of(ctx, app_spec).status(saga_id).model_dump_json(indent=2))


@cli.command(name="list")
@click.option("--state", default=None, help="Only sagas in this state.")
@click.option("--saga", default=None, help="Only sagas of this name.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@app_option
@click.pass_context
def list_(ctx: click.Context, app_spec: str, state: str | None, saga: str | None, limit: int, as_json: bool) -> None:
    """List sagas, most recently updated first."""
    statuses = app_of(ctx, app_spec).list(state=state, saga=saga, limit=limit)
    if as_json:
        for s in statuses:
            echo_json(s.model_dump_json())
    else:
        click.echo(status_table(statuses))


@cli.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def history(ctx: click.Context, app_spec: str, saga_id: str) -> None:
    """Print a saga's events in order, one JSON object per line."""
    for event in app_of(ctx, app_spec).history(saga_id):
        echo_json(event.model_dump_json())


@cli.command()
@click.argument("saga_id")
@click.argument("event")
@click.option("--data", default=None, help="The event's payload as a JSON object (@path: from a file, -: stdin).")
@app_option
@click.pass_context
def send(ctx: click.Context, app_spec: str, saga_id: str, event: str, data: str | None) -> None:
    """Deliver an event (e.g. an approval) to a waiting saga."""
    payload = read_json_argument(data, "--data")
    app_of(ctx, app_spec).send(saga_id, event, payload)
    echo(f"sent {short(event)} to {short(saga_id)}")


@cli.command()
@click.argument("saga_id")
@click.option("--reason", default=None, help="Why; recorded in the history.")
@click.option(
    "--no-compensate",
    is_flag=True,
    help="End the saga where it stands (also a failed one), running nothing more, not even compensations.",
)
@app_option
@click.pass_context
def cancel(ctx: click.Context, app_spec: str, saga_id: str, reason: str | None, no_compensate: bool) -> None:
    """Cancel a saga: what it did is compensated (unless --no-compensate)."""
    app_of(ctx, app_spec).cancel(saga_id, reason, compensate=not no_compensate)
    echo(f"{'ended' if no_compensate else 'cancelling'} {short(saga_id)}")


@cli.command()
@click.argument("saga_id")
@click.argument("step")
@click.option("--reason", default=None, help="What was done by hand; recorded in the history.")
@app_option
@click.pass_context
def resolve(ctx: click.Context, app_spec: str, saga_id: str, step: str, reason: str | None) -> None:
    """Mark a failed saga's failed compensation of STEP as done by hand; the rest of the undo runs."""
    app_of(ctx, app_spec).resolve_compensation(saga_id, step, reason)
    echo(f"resolved the compensation of {short(step)} in {short(saga_id)}")


@cli.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def retry(ctx: click.Context, app_spec: str, saga_id: str) -> None:
    """Resume a failed saga's compensations."""
    app_of(ctx, app_spec).retry(saga_id)
    echo(f"retrying {short(saga_id)}")


@cli.group()
def projections() -> None:
    """Read models built from the histories."""


@projections.command()
@app_option
@click.pass_context
def rebuild(ctx: click.Context, app_spec: str) -> None:
    """Rebuild the saga-status read model from the event histories."""
    from projections.status import StatusProjection

    progress = StatusProjection(app_of(ctx, app_spec)).rebuild()
    click.echo(f"rebuilt saga status: {progress.sagas} sagas from {progress.notifications} events")


@projections.command()
@click.option("--poll-interval", type=float, default=1.0, show_default=True)
@app_option
@click.pass_context
def run(ctx: click.Context, app_spec: str, poll_interval: float) -> None:
    """Keep the read models caught up with the histories until SIGTERM/SIGINT."""
    import signal
    import threading

    from projections.status import StatusProjection

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    StatusProjection(app_of(ctx, app_spec)).run_forever(stop, poll_interval)


@cli.command()
@click.option("--database", default=None, help="Database URL (default: SAGA_DATABASE_URL or sqlite:///sagaworks.db).")
@click.option("--count", type=click.IntRange(1, 1000), default=12, show_default=True, help="Sagas to start.")
@click.pass_context
def demo(ctx: click.Context, database: str | None, count: int) -> None:
    """Run a mix of the example sagas on the embedded database and print their final states."""
    from sagas.demo import run_demo  # the CLI is the composition root; the engine never imports sagas

    if ctx.parent is not None and ctx.parent.params.get("log_level") is None:
        # Progress, not logs: the demo's sagas fail on purpose, and the table shows how they ended.
        configure_logging(json=ctx.parent.params.get("json_logs"), level="critical")
    run_demo(database, count)


@cli.command()
@click.option("--workload", type=click.Choice(["ok", "compensate", "wait", "status"]), default="ok", show_default=True)
@click.option("--backend", type=click.Choice(["sqlite", "postgres", "memory"]), default="sqlite", show_default=True)
@click.option("--sagas", type=click.IntRange(1), default=None, help="Sagas per run [default: 5000; status: 200000].")
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Worker processes under load; 0 runs one worker in a thread of the bench (the only way for memory).",
)
@click.option(
    "--database",
    default=None,
    help="PostgreSQL server for --backend postgres, where a bench_* schema is made and dropped "
    "[default: SAGA_DATABASE_URL if postgresql, else postgresql://postgres@127.0.0.1:5432/test].",
)
@click.option("--limit", is_flag=True, help="Also measure single-row INSERT+COMMIT/s on 1 and 4 connections.")
@click.option("--limit-seconds", type=click.FloatRange(0.1), default=3.0, show_default=True, help="Per probe.")
@click.option("--runs", type=click.IntRange(1), default=1, show_default=True, help="Fresh databases; medians.")
@click.option("--unloaded-samples", type=click.IntRange(0), default=30, show_default=True)
@click.option("--start-batch", type=click.IntRange(1), default=200, show_default=True, help="Sagas per start_many.")
@click.option("--concurrency", type=click.IntRange(1), default=None, help="SAGA_CONCURRENCY of the workers.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="SAGA_BATCH_SIZE of the workers.")
@click.option("--json-only", is_flag=True, help="Print only the JSON line.")
@click.pass_context
def bench(ctx: click.Context, /, json_only: bool, **options: Any) -> None:
    """Measure a workload on a fresh database: throughput, latency, transactions; one JSON line last."""
    from benchmarks.bench import BenchOptions, json_line, run_bench  # the CLI is the composition root

    if ctx.parent is not None and ctx.parent.params.get("log_level") is None:
        configure_logging(json=ctx.parent.params.get("json_logs"), level="warning")  # progress, not logs
    say = (lambda _: None) if json_only else (lambda line: click.echo(line))
    try:
        result = run_bench(BenchOptions(**options), say)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(json_line(result))


def main() -> None:
    """Entry point of the ``saga`` script."""
    cli(prog_name="saga")
