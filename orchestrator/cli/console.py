"""What the CLI prints and reads: escaped text, JSON lines, the saga table, JSON arguments."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from orchestrator.readmodels.status import SagaStatus
from orchestrator.readmodels.timeline import TimelineEntry
from orchestrator.safety import escape, short
from orchestrator.schedules.spec import describe


def echo(text: str) -> None:
    """Print ``text`` with its control characters escaped (ids and errors come from anyone)."""
    click.echo(escape(text))


_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def echo_json(text: str) -> None:
    """Print a JSON document; characters a terminal would act on are written as ``\\uXXXX``."""
    click.echo(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


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


def timeline_table(entries: Sequence[TimelineEntry]) -> str:
    """A plain-text table of a saga's attempts, one line each."""
    rows = [("KIND", "NAME", "#", "STARTED", "MS", "OUTCOME", "WORKER", "ERROR")]
    for e in entries:
        rows.append(
            (
                e.kind,
                _cell(e.name, 40),
                str(e.attempt),
                e.started_at.strftime("%H:%M:%S.%f")[:-3],
                "-" if e.duration_ms is None else f"{e.duration_ms:.1f}",
                e.outcome,
                _cell(e.worker or "-", 30),
                _cell(e.error or "", 80),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ).rstrip()


def schedule_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of schedules, one line each."""
    table = [("SCHEDULE ID", "SAGA", "WHEN", "NEXT", "LAST SAGA", "STATE")]
    for row in rows:
        state = (
            f"paused: {row['reason']}" if row["paused"] and row["reason"] else "paused" if row["paused"] else "active"
        )
        table.append(
            (
                _cell(row["schedule_id"], 50),
                _cell(row["saga"], 40),
                _cell(describe(row["spec"]), 40),
                row["next_fire_at"] or "-",
                _cell(row["last_saga_id"] or "-", 70),
                _cell(state, 80),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=False)) + "  " + r[-1] for r in table
    ).rstrip()


def _cell(text: str, width: int) -> str:
    text = escape(text)
    return text if len(text) <= width else text[: width - 1] + "…"
