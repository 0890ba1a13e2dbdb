"""The ``saga`` command line, driven through click's runner on a SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner whose database is a fresh SQLite file and whose app is the test sagas."""
    monkeypatch.setenv("SAGA_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("SAGA_APP", "tests.cli_app:app")
    return CliRunner()


def test_start_worker_status_history_roundtrip(run: CliRunner) -> None:
    """start prints the id, a draining worker completes it, status and history show it."""
    started = run.invoke(cli, ["start", "Ship", "--input", '{"item": "lamp"}', "--id", "cli-1"])
    assert started.exit_code == 0, started.output
    assert started.output.strip() == "cli-1"
    assert run.invoke(cli, ["worker", "--drain"]).exit_code == 0
    status = run.invoke(cli, ["status", "cli-1"])
    assert json.loads(status.output)["state"] == "completed"
    history = run.invoke(cli, ["history", "cli-1"])
    types = [json.loads(line)["type"] for line in history.output.splitlines()]
    assert types[0] == "SagaStarted"
    assert types[-1] == "SagaCompleted"
    listed = run.invoke(cli, ["list", "--state", "completed"])
    assert "cli-1" in listed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "nope"], "no saga with id 'nope'"),
        (["start", "Nope", "--input", "{}"], "unknown saga"),
        (["start", "Ship", "--input", '{"wrong": 1}'], "invalid input"),
        (["start", "Ship", "--input", "not json"], "not valid JSON"),
        (["list", "--state", "bogus"], "unknown state"),
        (["send", "nope", "approved"], "no saga with id"),
    ],
)
def test_errors_print_one_line_and_exit_non_zero(run: CliRunner, args: list[str], message: str) -> None:
    """Bad input or an unknown saga prints one clear error line and exits non-zero."""
    result = run.invoke(cli, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_projections_rebuild_reports_counts(run: CliRunner) -> None:
    """projections rebuild replays the histories and says how many sagas it wrote."""
    run.invoke(cli, ["start", "Ship", "--input", '{"item": "a"}'])
    result = run.invoke(cli, ["projections", "rebuild"])
    assert result.exit_code == 0, result.output
    assert "rebuilt saga status: 1 sagas" in result.output


def test_schedules_add_list_pause_resume_trigger_backfill_delete(run: CliRunner) -> None:
    """Each `saga schedules` command does its one thing, and a bad cron or time zone exits 1 writing nothing."""
    added = run.invoke(
        cli,
        [*("schedules", "add", "Ship", "--id", "weekly", "--cron", "0 8 * * MON"), "--input", '{"item": "crate"}'],
    )
    assert (added.exit_code, added.output.strip()) == (0, "weekly")
    for bad, message in [
        (["--cron", "0 8 * * FOO"], "not a cron expression"),
        (["--tz", "Mars/Base"], "unknown time zone"),
    ]:
        options = ["--cron", "0 8 * * *", "--input", '{"item": "x"}']
        result = run.invoke(cli, ["schedules", "add", "Ship", "--id", "bad", *options, *bad])
        assert result.exit_code == 1
        assert message in result.output
    listed = run.invoke(cli, ["schedules", "list", "--json"])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [(r["schedule_id"], r["spec"]["cron"], r["next_fire_at"][-6:]) for r in rows] == [
        ("weekly", "0 8 * * MON", "+00:00")
    ]
    assert run.invoke(cli, ["schedules", "pause", "weekly", "--reason", "holiday"]).exit_code == 0
    assert "paused: holiday" in run.invoke(cli, ["schedules", "list"]).output
    assert run.invoke(cli, ["schedules", "resume", "weekly"]).exit_code == 0
    fired = run.invoke(cli, ["schedules", "trigger", "weekly"])
    assert fired.stdout.startswith("schedule:weekly:manual:")
    window = ["--from", "2026-11-02T00:00:00+00:00", "--to", "2026-11-17T00:00:00+00:00"]
    backfilled = run.invoke(cli, ["schedules", "backfill", "weekly", *window])
    assert backfilled.stdout.split() == [
        "schedule:weekly:2026-11-02T08:00:00+00:00",
        "schedule:weekly:2026-11-09T08:00:00+00:00",
        "schedule:weekly:2026-11-16T08:00:00+00:00",
    ]
    assert run.invoke(cli, ["worker", "--drain"]).exit_code == 0
    completed = run.invoke(cli, ["list", "--state", "completed", "--json"]).output.splitlines()
    assert len(completed) == 4
    assert run.invoke(cli, ["schedules", "delete", "weekly"]).exit_code == 0
    assert run.invoke(cli, ["schedules", "list", "--json"]).output == ""
    gone = run.invoke(cli, ["schedules", "trigger", "weekly"])
    assert gone.exit_code == 1
    assert "was deleted" in gone.output
