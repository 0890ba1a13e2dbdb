"""Retention: old finished sagas leave the read models; with an archive their histories are written
to a JSON-lines file first and then deleted; running, failed and not-yet-notified sagas stay, and a
follower that has not read a history holds back its deletion."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from orchestrator import InvalidInput, Orchestrator, SagaNotFound, SagaState, every
from orchestrator.aggregate import aggregate_id
from orchestrator.cli import cli
from orchestrator.retention import Retention
from projections import Projection
from tests.conftest import drain
from tests.test_smoke import Ship

JUST_NOW = timedelta(milliseconds=1)


class Counting(Projection):
    """A user projection (it follows the log, so histories it has not read must stay)."""

    name = "counting"

    def apply(self, change: Any, rows: Any) -> None:
        rows.put("count", {"n": 1})


def finished(orch: Orchestrator, n: int) -> list[str]:
    """Start and complete ``n`` sagas; their ids."""
    ids = [orch.start(Ship, {"item": f"crate-{i}"}) for i in range(n)]
    drain(orch, *ids)
    time.sleep(0.01)
    return ids


def test_purging_without_an_archive_keeps_the_histories(durable_url: str) -> None:
    """Finished sagas leave the status read model (status says not found), their histories stay, and a
    pending saga is left alone."""
    with Orchestrator(sagas=[Ship], database=durable_url) as orch:
        done = finished(orch, 3)
        pending = orch.start(Ship, {"item": "later"})
        purged = orch.purge(JUST_NOW)
        assert (purged.sagas, purged.archived) == (3, 0)
        for saga_id in done:
            with pytest.raises(SagaNotFound):
                orch.status(saga_id)
            assert orch.history(saga_id)[-1].type == "SagaCompleted"
        assert orch.status(pending).state is SagaState.PENDING
        assert orch.purge(JUST_NOW).sagas == 0


def test_purging_with_an_archive_writes_then_deletes_the_histories(durable_url: str, tmp_path: Path) -> None:
    """Each purged saga is one JSON line with its whole history; then its events are gone, its id is
    free for a new saga, and sagas finished after the cutoff stay."""
    archive = tmp_path / "sagas.jsonl"
    with Orchestrator(sagas=[Ship], database=durable_url) as orch:
        old = finished(orch, 4)
        purged = orch.purge(timedelta(milliseconds=5), archive=archive)
        assert (purged.sagas, purged.archived, purged.archive) == (4, 4, str(archive))
        lines = [json.loads(line) for line in archive.read_text().splitlines()]
        assert sorted(line["saga_id"] for line in lines) == sorted(old)
        assert all(line["events"][0]["type"] == "SagaStarted" for line in lines)
        assert all(line["events"][-1]["type"] == "SagaCompleted" for line in lines)
        assert orch.repository.events(aggregate_id(old[0])) == []
        with pytest.raises(SagaNotFound):
            orch.history(old[0])
        again = orch.start(Ship, {"item": "new"}, saga_id=old[0])
        assert orch.status(again).state is SagaState.PENDING
        assert orch.purge(timedelta(hours=1), archive=archive).sagas == 0


def test_a_follower_behind_holds_back_the_deletion_of_histories(durable_url: str, tmp_path: Path) -> None:
    """With a registered projection that has not read the log yet, nothing is archived or deleted;
    once it has caught up, the purge goes ahead."""
    archive = tmp_path / "sagas.jsonl"
    with Orchestrator(sagas=[Ship], database=durable_url, projections=[Counting()]) as orch:
        finished(orch, 2)
        assert orch.purge(JUST_NOW, archive=archive).sagas == 0
        orch.run_projections()
        assert orch.purge(JUST_NOW, archive=archive).archived == 2


def test_bad_purges_are_refused(tmp_path: Path) -> None:
    """A non-positive period, an unfinished state or an archive in a missing directory raise InvalidInput."""
    with Orchestrator(sagas=[Ship], database="memory://") as orch:
        with pytest.raises(InvalidInput, match="positive"):
            orch.purge(timedelta(0))
        with pytest.raises(InvalidInput, match="not a finished state"):
            orch.purge(JUST_NOW, states=["running"])
        with pytest.raises(InvalidInput, match="does not exist"):
            orch.purge(JUST_NOW, archive=tmp_path / "missing" / "a.jsonl")


class Cleanup(Retention):
    schedules: ClassVar[list[Any]] = [every(3600, input={"older_than_days": 0.00000001}, name="cleanup")]


def test_the_retention_saga_purges_from_a_worker(durable_url: str, tmp_path: Path) -> None:
    """The built-in Retention saga, subclassed with a schedule, runs in a worker and purges what is old
    (the scheduled run itself is not finished while it runs, so it stays)."""
    with Orchestrator(sagas=[Ship, Cleanup], database=durable_url) as orch:
        finished(orch, 3)
        run = orch.scheduler.trigger("cleanup")
        [status] = drain(orch, run)
        assert status.state is SagaState.COMPLETED
        assert status.result["purge"]["sagas"] == 3


def test_saga_purge_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """saga purge --older-than takes 30d/12h/90m/3600s, prints what it did as JSON, and refuses a bad period."""
    monkeypatch.setenv("SAGA_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("SAGA_APP", "tests.cli_app:app")
    runner = CliRunner()
    assert runner.invoke(cli, ["start", "Ship", "--input", '{"item": "a"}']).exit_code == 0
    assert runner.invoke(cli, ["worker", "--drain"]).exit_code == 0
    time.sleep(0.01)
    kept = runner.invoke(cli, ["purge", "--older-than", "30d"])
    assert json.loads(kept.stdout)["sagas"] == 0
    archive = tmp_path / "a.jsonl"
    gone = runner.invoke(cli, ["purge", "--older-than", "0.001s", "--archive", str(archive)])
    assert json.loads(gone.stdout)["archived"] == 1
    bad = runner.invoke(cli, ["purge", "--older-than", "soon"])
    assert bad.exit_code == 2
    assert "not a period" in bad.output
