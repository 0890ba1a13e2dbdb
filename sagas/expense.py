"""``ExpenseClaim``: record the claim, wait for the manager's approval, pay it out.

The wait is durable: no worker is busy while the claim sits in a manager's inbox. The approval
arrives with ``orch.send(saga_id, "approved", {"by": "..."})``; without it the claim is withdrawn
when ``APPROVAL_TIMEOUT`` has passed. A manager who rejects the claim cancels the saga
(``orch.cancel(saga_id, reason="rejected")``), which withdraws it too.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from pydantic import BaseModel, Field

from orchestrator import DomainEvent, Limits, RetryPolicy, Saga, on, step, wait_for
from sagas.services import SERVICES, Claim, Payment

APPROVAL_TIMEOUT = timedelta(days=2)
LEDGER_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.05, backoff=2.0, max_interval=1)
"""Short intervals so that the demo and the tests are quick; a real service would wait seconds."""


class Expense(BaseModel):
    """What the employee claims."""

    employee: str = Field(min_length=1)
    amount: Decimal = Field(gt=0)
    description: str
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")


class ClaimSubmitted(DomainEvent):
    """The expense form was submitted (``orch.emit`` or ``POST /events/ClaimSubmitted``)."""

    employee: str
    amount: Decimal
    description: str
    currency: str = "EUR"
    draft: bool = False
    """A draft is only saved, not submitted for approval: it starts nothing."""


class ExpenseClaim(Saga[Expense]):
    """Record the claim, wait for the manager's approval, pay; withdraw the claim if none comes.

    Started by hand, or by each submitted (not draft) ``ClaimSubmitted``; at most ten claims of one
    employee are in flight at once (the rest wait their turn, in order).
    """

    search = ["employee"]
    triggers = [
        on(
            ClaimSubmitted,
            when=lambda claim: not claim.draft,
            input=lambda claim: Expense(
                employee=claim.employee, amount=claim.amount, description=claim.description, currency=claim.currency
            ),
        )
    ]
    limits = Limits(max_running=10, per=lambda expense: expense.employee)

    @step(retry=LEDGER_RETRY)
    def submit(self, expense: Expense) -> Claim:
        return SERVICES.ledger.submit(expense.employee, expense.amount, key=self.idempotency_key)

    @submit.compensate
    def withdraw(self, expense: Expense, claim: Claim) -> None:
        SERVICES.ledger.withdraw(claim.id)

    approval = wait_for("approved", timeout=APPROVAL_TIMEOUT, on_timeout="compensate")

    @step(retry=LEDGER_RETRY)
    def pay(self, expense: Expense) -> Payment:
        claim: Claim = self.results["submit"]
        self.log.info("claim approved", by=self.received["approved"].get("by"))
        return SERVICES.ledger.pay_out(claim.id, expense.amount, key=self.idempotency_key)

    @pay.compensate
    def reverse_payment(self, expense: Expense, payment: Payment) -> None:
        SERVICES.ledger.reverse(payment.id)
