"""Read models of the catalogue: what the company has approved to pay, per employee."""

from __future__ import annotations

from decimal import Decimal

from projections import Change, Projection, Rows


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
