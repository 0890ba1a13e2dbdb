"""The status read model: written with the events, rebuilt and caught up from the histories."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from orchestrator import Orchestrator, SagaNotFound, SagaState
from projections import StatusProjection
from tests.conftest import drain
from tests.test_smoke import Ship


def test_rebuild_restores_every_status_from_the_histories(database_url: str) -> None:
    """After the status rows are wiped, a rebuild brings back the same statuses and tracking position."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        later = datetime.now(UTC) + timedelta(hours=1)
        ids = [orch.start(Ship, {"item": f"item-{i}"}, start_at=later if i >= 4 else None) for i in range(7)]
        drain(orch, *ids[:4])
        before = {saga_id: orch.status(saga_id) for saga_id in ids}
        position = orch.store.index.status_position()
        orch.store.index.write_status([], None, reset=True)
        assert orch.list() == []
        progress = StatusProjection(orch, page_size=5).rebuild()
        after = {saga_id: orch.status(saga_id) for saga_id in ids}
        assert orch.store.index.status_position() == position
    assert after == before
    assert progress.sagas >= 7
    assert [s.state for s in after.values()] == [SagaState.COMPLETED] * 4 + [SagaState.PENDING] * 3


def test_tracking_position_follows_every_save(database_url: str) -> None:
    """The tracking record moves with each save, so a catch-up finds nothing left to replay."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        saga_id = orch.start(Ship, {"item": "x"})
        first = orch.store.index.status_position()
        drain(orch, saga_id)
        assert orch.store.index.status_position() == orch.store.recorder.max_notification_id()
        assert (orch.store.index.status_position() or 0) > (first or 0)
        assert StatusProjection(orch).catch_up().sagas == 0


def test_status_keeps_answering_during_a_rebuild() -> None:
    """A rebuild rewrites rows in place: status() never says 'not found' for a started saga meanwhile."""
    with Orchestrator(sagas=[Ship], database="memory://") as orch:
        ids = [orch.start(Ship, {"item": f"i{i}"}) for i in range(60)]
        missing: list[str] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                for saga_id in ids:
                    try:
                        orch.status(saga_id)
                    except SagaNotFound:
                        missing.append(saga_id)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            progress = StatusProjection(orch, page_size=1).rebuild()
        finally:
            done.set()
            reader.join()
    assert progress.sagas == 60
    assert missing == []
