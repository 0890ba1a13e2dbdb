"""Schema versions: a database made by an older release is migrated on open, once, however many open it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestrator import Orchestrator, SagaState
from orchestrator.storage.sqlite import QUERIES
from tests.conftest import drain
from tests.test_smoke import Ship

ROOT = Path(__file__).resolve().parent.parent


def downgrade_to_v1(orch: Orchestrator) -> None:
    """Make the database look as release 0.1.0 left it: no schema version, no columns added since."""
    recorder = orch.store.recorder
    with recorder.datastore.transaction(commit=True) as cursor:  # type: ignore[attr-defined]
        if orch.database.kind == "sqlite":
            for statement in (
                "DROP TABLE saga_schema",
                "ALTER TABLE saga_status DROP COLUMN problem",
                "ALTER TABLE saga_work DROP COLUMN failures",
                "ALTER TABLE saga_status DROP COLUMN search",
                "DROP INDEX saga_status_pool",
                "ALTER TABLE saga_status DROP COLUMN pool",
                "ALTER TABLE saga_status DROP COLUMN pool_key",
                "ALTER TABLE saga_status DROP COLUMN queued",
                "ALTER TABLE saga_status DROP COLUMN pool_due",
            ):
                cursor.execute(statement)
        else:
            schema = recorder.datastore.schema  # type: ignore[attr-defined]
            cursor.execute(
                f"DROP TABLE {schema}.saga_schema; ALTER TABLE {schema}.saga_status DROP COLUMN problem;"
                f" ALTER TABLE {schema}.saga_work DROP COLUMN failures;"
                f" ALTER TABLE {schema}.saga_status DROP COLUMN search;"
                f" ALTER TABLE {schema}.saga_status DROP COLUMN pool, DROP COLUMN pool_key, DROP COLUMN queued,"
                " DROP COLUMN pool_due"
            )


def test_a_database_of_the_previous_release_is_migrated_on_open(durable_url: str) -> None:
    """Sagas started before the upgrade finish after it, and the new columns work (a status problem)."""
    with Orchestrator(sagas=[Ship], database=durable_url) as orch:
        before = orch.start(Ship, {"item": "old"})
        downgrade_to_v1(orch)
    with Orchestrator(sagas=[Ship], database=durable_url) as orch:
        after = orch.start(Ship, {"item": "new"})
        statuses = drain(orch, before, after)
        recorder = orch.store.recorder
        with recorder.datastore.transaction(commit=False) as cursor:  # type: ignore[attr-defined]
            table = "saga_schema" if orch.database.kind == "sqlite" else f"{recorder.datastore.schema}.saga_schema"  # type: ignore[attr-defined]
            cursor.execute(f"SELECT count(*), max(version) FROM {table}")
            row = cursor.fetchone()
            count, version = tuple(row.values()) if isinstance(row, dict) else tuple(row)
    assert [s.state for s in statuses] == [SagaState.COMPLETED, SagaState.COMPLETED]
    assert (count, version) == (1, len(QUERIES.migrations))


OPEN = """
import sys
from orchestrator import Orchestrator
from tests.test_smoke import Ship
with Orchestrator(sagas=[Ship], database=sys.argv[1]) as orch:
    orch.start(Ship, {"item": "x"})
"""


def test_processes_opening_an_old_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Six processes that open a not yet migrated SQLite file together migrate it once and all start a saga."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with Orchestrator(sagas=[Ship], database=url) as orch:
        downgrade_to_v1(orch)
    processes = [
        subprocess.Popen([sys.executable, "-c", OPEN, url], cwd=ROOT, stderr=subprocess.PIPE) for _ in range(6)
    ]
    errors = [p.communicate(timeout=60)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, errors
    with Orchestrator(sagas=[Ship], database=url) as orch:
        assert len(orch.list()) == 6
