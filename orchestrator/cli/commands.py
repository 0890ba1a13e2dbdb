"""The commands that start, steer and read sagas: one database round trip each, one line out."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, ClassVar

import click

from orchestrator import retention
from orchestrator.cli.app import app_of, app_option
from orchestrator.cli.console import echo, echo_json, read_json_argument, status_table, timeline_table
from orchestrator.safety import short


@click.command()
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
    ctx: click.Context, app_spec: str | None, saga: str, input_json: str, saga_id: str | None, start_at: datetime | None
) -> None:
    """Start a saga and print its id."""
    data = read_json_argument(input_json, "--input")
    echo(app_of(ctx, app_spec).start(saga, data, saga_id=saga_id, start_at=start_at))


@click.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def status(ctx: click.Context, app_spec: str | None, saga_id: str) -> None:
    """Print a saga's status as JSON."""
    echo_json(app_of(ctx, app_spec).status(saga_id).model_dump_json(indent=2))


@click.command(name="list")
@click.option("--state", default=None, help="Only sagas in this state.")
@click.option("--saga", default=None, help="Only sagas of this name.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@app_option
@click.pass_context
def list_(
    ctx: click.Context, app_spec: str | None, state: str | None, saga: str | None, limit: int, as_json: bool
) -> None:
    """List sagas, most recently updated first."""
    statuses = app_of(ctx, app_spec).list(state=state, saga=saga, limit=limit)
    if as_json:
        for s in statuses:
            echo_json(s.model_dump_json())
    else:
        click.echo(status_table(statuses))


@click.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def history(ctx: click.Context, app_spec: str | None, saga_id: str) -> None:
    """Print a saga's events in order, one JSON object per line."""
    for event in app_of(ctx, app_spec).history(saga_id):
        echo_json(event.model_dump_json())


@click.command()
@click.argument("saga_id")
@click.argument("event")
@click.option("--data", default=None, help="The event's payload as a JSON object (@path: from a file, -: stdin).")
@app_option
@click.pass_context
def send(ctx: click.Context, app_spec: str | None, saga_id: str, event: str, data: str | None) -> None:
    """Deliver an event (e.g. an approval) to a waiting saga."""
    payload = read_json_argument(data, "--data")
    app_of(ctx, app_spec).send(saga_id, event, payload)
    echo(f"sent {short(event)} to {short(saga_id)}")


@click.command()
@click.argument("saga_id")
@click.option("--reason", default=None, help="Why; recorded in the history.")
@click.option(
    "--no-compensate",
    is_flag=True,
    help="End the saga where it stands (also a failed one), running nothing more, not even compensations.",
)
@app_option
@click.pass_context
def cancel(ctx: click.Context, app_spec: str | None, saga_id: str, reason: str | None, no_compensate: bool) -> None:
    """Cancel a saga: what it did is compensated (unless --no-compensate)."""
    app_of(ctx, app_spec).cancel(saga_id, reason, compensate=not no_compensate)
    echo(f"{'ended' if no_compensate else 'cancelling'} {short(saga_id)}")


@click.command()
@click.argument("saga_id")
@click.argument("step")
@click.option("--reason", default=None, help="What was done by hand; recorded in the history.")
@app_option
@click.pass_context
def resolve(ctx: click.Context, app_spec: str | None, saga_id: str, step: str, reason: str | None) -> None:
    """Mark a failed saga's failed compensation of STEP as done by hand; the rest of the undo runs."""
    app_of(ctx, app_spec).resolve_compensation(saga_id, step, reason)
    echo(f"resolved the compensation of {short(step)} in {short(saga_id)}")


@click.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def retry(ctx: click.Context, app_spec: str | None, saga_id: str) -> None:
    """Resume a failed saga's compensations."""
    app_of(ctx, app_spec).retry(saga_id)
    echo(f"retrying {short(saga_id)}")


@click.command()
@click.argument("saga_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@app_option
@click.pass_context
def timeline(ctx: click.Context, app_spec: str | None, saga_id: str, as_json: bool) -> None:
    """Print every attempt of every step, compensation, wait and notification, with its timing."""
    entries = app_of(ctx, app_spec).timeline(saga_id)
    if as_json:
        for entry in entries:
            echo_json(entry.model_dump_json())
        return
    click.echo(timeline_table(entries))  # cells are escaped


@click.command()
@click.argument("name")
@click.option("--data", default=None, help="The event as a JSON object (@path: from a file, -: stdin).")
@click.option("--id", "event_id", default=None, help="The event's id (a repeat records nothing); default: a new one.")
@app_option
@click.pass_context
def emit(ctx: click.Context, app_spec: str | None, name: str, data: str | None, event_id: str | None) -> None:
    """Record a domain event NAME; the sagas it triggers start soon after, in a worker. Prints its id."""
    payload = read_json_argument(data, "--data")
    echo(app_of(ctx, app_spec).emit(name, payload, event_id=event_id))


@click.command()
@click.option("--name", default=None, help="Only events of this name.")
@click.option("--after", type=click.IntRange(0), default=0, help="Only events after this position.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@app_option
@click.pass_context
def events(ctx: click.Context, app_spec: str | None, name: str | None, after: int, limit: int) -> None:
    """List domain events, one JSON object per line, with what the triggers did with each."""
    for info in app_of(ctx, app_spec).events(name, after=after, limit=limit):
        echo_json(info.model_dump_json())


class Duration(click.ParamType[timedelta]):
    """A period such as ``30d``, ``12h``, ``90m`` or ``3600s`` (plain numbers are seconds)."""

    name = "duration"
    UNITS: ClassVar[dict[str, float]] = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:], None)
        number = text[:-1] if unit is not None else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            self.fail(f"{value!r} is not a period such as 30d, 12h, 90m or 3600s", param, ctx)
        if not 0 < seconds < 1e10:
            self.fail(f"{value!r} is not a positive period", param, ctx)
        return timedelta(seconds=seconds)


@click.command()
@click.option("--older-than", type=Duration(), required=True, help="Finished longer ago than this (30d, 12h, ...).")
@click.option(
    "--archive",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Append their histories to this JSON-lines file, then delete them (default: histories kept).",
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["completed", "compensated", "cancelled", "failed"]),
    help="Only sagas in these states [default: completed, compensated, cancelled].",
)
@app_option
@click.pass_context
def purge(
    ctx: click.Context, app_spec: str | None, older_than: timedelta, archive: str | None, states: tuple[str, ...]
) -> None:
    """Remove old finished sagas from the read models (and, with --archive, their histories)."""
    orch = app_of(ctx, app_spec)
    purged = orch.purge(older_than, archive=archive, states=states or retention.FINISHED)
    echo_json(purged.model_dump_json())


COMMANDS = [start, status, list_, history, timeline, send, cancel, resolve, retry, emit, events, purge]
