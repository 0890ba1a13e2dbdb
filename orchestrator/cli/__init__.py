"""The ``saga`` command line: run workers and the demo, start and steer sagas, read their state.

Engine errors become one clear line on stderr and exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from eventsourcing.persistence import PersistenceError
from pydantic import ValidationError

from orchestrator.cli import commands, run
from orchestrator.cli.schedules import schedules
from orchestrator.errors import OrchestratorError
from orchestrator.logging import configure_logging
from orchestrator.safety import escape
from orchestrator.settings import LOG_LEVELS, Settings


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


for command in [*commands.COMMANDS, *run.COMMANDS, schedules]:
    cli.add_command(command)


def main() -> None:
    """Entry point of the ``saga`` script."""
    cli(prog_name="saga")
