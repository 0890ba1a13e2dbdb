"""``saga demo``: a mix of the catalogue's sagas on the embedded database, run by a worker.

Trips, orders and expense claims start together against fake services that throw transient
faults; one flight is sold out and one order asks for more lamps than the warehouse holds, so
those sagas compensate; the demo approves most expense claims and rejects one (a cancel).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import click

from orchestrator import Orchestrator, SagaState, SagaStatus
from orchestrator.cli.console import status_table
from orchestrator.worker import Worker
from sagas import DEMO
from sagas.services import SERVICES, Faults

SOLD_OUT = "XX404"


def demo_inputs(count: int) -> list[tuple[str, dict[str, Any]]]:
    """``count`` saga inputs, a trip, an order and an expense claim in turn, some bound to fail."""
    kinds = itertools.cycle(["BookTrip", "FulfilOrder", "ExpenseClaim"])
    inputs: list[tuple[str, dict[str, Any]]] = []
    for i, kind in zip(range(count), kinds, strict=False):
        if kind == "BookTrip":
            flight = SOLD_OUT if i % 9 == 3 or i == 0 else f"LH{400 + i}"
            inputs.append((kind, {"traveller": f"T{i}", "hotel": "Adlon", "car": "Golf", "flight": flight}))
        elif kind == "FulfilOrder":
            quantity = 50 if i % 9 == 4 else 1  # the warehouse holds 3 lamps
            inputs.append(
                (
                    kind,
                    {
                        "order_id": f"O{i}",
                        "items": [["lamp", quantity]],
                        "amount": str(Decimal("19.90") * quantity),
                        "address": "Berlin",
                    },
                )
            )
        else:
            inputs.append((kind, {"employee": f"E{i}", "amount": "42.50", "description": "taxi"}))
    return inputs


def run_demo(database: str | None, count: int) -> list[SagaStatus]:
    """Start ``count`` sagas, run a worker until all finish, print progress and a final table."""
    SERVICES.reset(
        hotel=Faults(transient_rate=0.3, seed=7),
        car=Faults(transient_failures=2),
        flight=Faults(refused=frozenset({SOLD_OUT})),
        payment=Faults(transient_rate=0.2, seed=3),
        stock={"lamp": 3 + count, "book": 10, "chair": 4},
    )
    orch = Orchestrator(sagas=DEMO, database=database)
    run_id = uuid.uuid4().hex[:6]
    with orch:
        click.echo(f"sagaworks demo: {count} sagas on {orch.database.url}")
        ids = [
            orch.start(kind, data, saga_id=f"{kind}-{run_id}-{i}") for i, (kind, data) in enumerate(demo_inputs(count))
        ]
        worker = Worker(orch, poll_interval=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False}, daemon=True)
        thread.start()
        claims = [saga_id for saga_id in ids if saga_id.startswith("ExpenseClaim")]
        answered: set[str] = set()
        started = time.monotonic()
        try:
            while True:
                statuses = [orch.status(saga_id) for saga_id in ids]
                for status in statuses:
                    if (
                        status.saga_id in claims
                        and status.state is SagaState.WAITING
                        and status.saga_id not in answered
                    ):
                        answered.add(status.saga_id)
                        if status.saga_id == claims[-1] and len(claims) > 1:
                            orch.cancel(status.saga_id, "manager rejected the claim")
                        else:
                            orch.send(status.saga_id, "approved", {"by": "manager"})
                counts = {state: sum(s.state is state for s in statuses) for state in SagaState}
                line = "  ".join(f"{state.value} {n}" for state, n in counts.items() if n)
                click.echo(f"  {time.monotonic() - started:5.1f}s  {line}")
                if all(s.state.terminal for s in statuses):
                    break
                if time.monotonic() - started > 60:
                    raise click.ClickException("the demo's sagas did not finish within 60 s")
                time.sleep(0.25)
        finally:
            worker.stop()
            thread.join(timeout=30)
    click.echo("")
    click.echo(status_table(statuses))
    return statuses
