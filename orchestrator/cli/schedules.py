"""``saga schedules``: create, list, pause, resume, fire, backfill and delete schedules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
import orjson

from orchestrator.cli.app import app_of, app_option
from orchestrator.cli.console import echo, echo_json, read_json_argument, schedule_table
from orchestrator.safety import short

MOMENT = click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"])


@click.group()
def schedules() -> None:
    """Sagas started by the clock; every worker fires the due ticks, each exactly once."""


@schedules.command()
@click.argument("saga")
@click.option("--id", "schedule_id", required=True, help="The schedule's id (adding it again edits it).")
@click.option("--cron", default=None, help='A cron expression, e.g. "0 8 * * MON".')
@click.option("--every", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds between ticks.")
@click.option("--at", type=MOMENT, default=None, help="Once, at this timezone-aware time.")
@click.option("--tz", default="UTC", show_default=True, help="The cron expression's time zone (IANA name).")
@click.option("--input", "input_json", default=None, help="The saga's input as a JSON object (@path, -: stdin).")
@click.option("--catch-up", type=click.Choice(["skip", "latest", "all"]), default="skip", show_default=True)
@click.option("--catch-up-window", type=click.FloatRange(min=0, min_open=True), default=86_400.0, show_default=True)
@click.option("--overlap", type=click.Choice(["skip", "buffer", "allow"]), default="skip", show_default=True)
@click.option("--jitter", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Seconds, at most.")
@click.option("--start", type=MOMENT, default=None, help="No ticks before this time.")
@click.option("--end", type=MOMENT, default=None, help="No ticks after this time.")
@app_option
@click.pass_context
def add(
    ctx: click.Context, /, app_spec: str | None, saga: str, schedule_id: str, input_json: str | None, **spec: Any
) -> None:
    """Create (or edit) a schedule that starts SAGA; prints its id."""
    spec["input"] = read_json_argument(input_json, "--input")
    spec = {key: value for key, value in spec.items() if value is not None}
    echo(app_of(ctx, app_spec).schedule(saga, schedule_id=schedule_id, **spec))


@schedules.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@app_option
@click.pass_context
def list_(ctx: click.Context, app_spec: str | None, as_json: bool) -> None:
    """List schedules with their next fire time and last runs."""
    rows = app_of(ctx, app_spec).scheduler.rows()
    if as_json:
        for row in rows:
            echo_json(orjson.dumps(row).decode())
    else:
        click.echo(schedule_table(rows))


@schedules.command()
@click.argument("schedule_id")
@click.option("--reason", default=None, help="Why; recorded in the schedule's history.")
@app_option
@click.pass_context
def pause(ctx: click.Context, app_spec: str | None, schedule_id: str, reason: str | None) -> None:
    """Stop a schedule firing until it is resumed."""
    app_of(ctx, app_spec).scheduler.pause(schedule_id, reason)
    echo(f"paused {short(schedule_id)}")


@schedules.command()
@click.argument("schedule_id")
@app_option
@click.pass_context
def resume(ctx: click.Context, app_spec: str | None, schedule_id: str) -> None:
    """Let a paused schedule fire again (missed ticks follow its catch-up policy)."""
    app_of(ctx, app_spec).scheduler.resume(schedule_id)
    echo(f"resumed {short(schedule_id)}")


@schedules.command()
@click.argument("schedule_id")
@app_option
@click.pass_context
def trigger(ctx: click.Context, app_spec: str | None, schedule_id: str) -> None:
    """Fire a schedule now, off the clock; prints the started saga's id."""
    echo(app_of(ctx, app_spec).scheduler.trigger(schedule_id))


@schedules.command()
@click.argument("schedule_id")
@click.option("--from", "start", type=MOMENT, required=True, help="First moment (included).")
@click.option("--to", "end", type=MOMENT, required=True, help="Last moment (excluded).")
@app_option
@click.pass_context
def backfill(ctx: click.Context, app_spec: str | None, schedule_id: str, start: datetime, end: datetime) -> None:
    """Fire every tick in [--from, --to) that has not run yet; prints the saga ids, one per line."""
    for saga_id in app_of(ctx, app_spec).scheduler.backfill(schedule_id, start, end):
        echo(saga_id)


@schedules.command()
@click.argument("schedule_id")
@app_option
@click.pass_context
def delete(ctx: click.Context, app_spec: str | None, schedule_id: str) -> None:
    """Delete a schedule: it fires no more (its history stays)."""
    app_of(ctx, app_spec).scheduler.delete(schedule_id)
    echo(f"deleted {short(schedule_id)}")
