"""Reports of the catalogue: what the company has approved to pay, per employee (a read model),
a weekday expense report (a schedule) and the nightly clean-up of old sagas (retention)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from orchestrator import Saga, cron, step
from orchestrator.retention import Retention
from projections import Change, Projection, Rows
from sagas.services import SERVICES, Claim, Payment


class ApprovedExpenses(Projection):
    """Total approved expense per employee: every completed expense claim, counted once."""

    name = "approved_expenses"
    events = ["SagaCompleted"]
    sagas = ["ExpenseClaim"]

    def apply(self, change: Change, rows: Rows) -> None:
        claim = change.input
        row = rows.get(claim["employee"]) or {"claims": 0, "total": "0"}
        # Decimal in strings: a sum of money must not drift the way floats do.
        row["total"] = str(Decimal(row["total"]) + Decimal(str(claim["amount"])))
        row["claims"] += 1
        row["currency"] = claim.get("currency", "EUR")
        rows.put(claim["employee"], row)


class ReportRequest(BaseModel):
    """Which report the schedule asks for."""

    period: str = "daily"


class ExpenseReport(Saga[ReportRequest]):
    """The open and paid expense claims, every weekday at 08:00 Berlin time (a schedule)."""

    schedules = [
        cron("0 8 * * MON-FRI", tz="Europe/Berlin", input={"period": "daily"}, catch_up="latest", name="expense-report")
    ]

    @step
    def summarise(self, request: ReportRequest) -> dict[str, Any]:
        ledger = SERVICES.ledger
        claims = [r for r in ledger.records.values() if isinstance(r, Claim)]
        paid = [r for r in ledger.records.values() if isinstance(r, Payment) and r.id not in ledger.undone]
        return {
            "period": request.period,
            "open_claims": sum(1 for c in claims if c.id not in ledger.undone),
            "paid": str(sum((p.amount for p in paid), Decimal(0))),
        }


class NightlyCleanup(Retention):
    """Every night at 03:30 UTC: finished sagas older than 30 days leave the read models."""

    schedules = [cron("30 3 * * *", input={"older_than_days": 30}, name="nightly-cleanup")]
