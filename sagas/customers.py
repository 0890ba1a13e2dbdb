"""``Onboarding``: welcome each customer the ``Customers`` application registers.

``Customers`` is another eventsourcing application (a CRM, say) that records its changes as
events and knows nothing of sagas. ``Onboarding`` follows its log: each ``Customer.Registered``
of a paying plan starts one onboarding, exactly once, however many workers run and whatever
crashes (a data-change trigger: ``on_change``).
"""

from __future__ import annotations

from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from pydantic import BaseModel, Field

from orchestrator import RetryPolicy, Saga, on_change, step
from sagas.services import SERVICES, Message

MAIL_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.05, backoff=2.0, max_interval=1)


class Customer(Aggregate):
    """A customer of the CRM."""

    class Registered(Aggregate.Created):
        name: str
        email: str
        plan: str

    class PlanChanged(Aggregate.Event):
        plan: str

    @event(Registered)
    def __init__(self, name: str, email: str, plan: str) -> None:
        self.name = name
        self.email = email
        self.plan = plan

    @event(PlanChanged)
    def change_plan(self, plan: str) -> None:
        self.plan = plan


class Customers(Application[UUID]):
    """The upstream application: registers customers and changes their plans."""

    def register(self, name: str, email: str, plan: str = "pro") -> UUID:
        """Register a customer; its id."""
        customer = Customer(name=name, email=email, plan=plan)
        self.save(customer)
        return customer.id

    def change_plan(self, customer_id: UUID, plan: str) -> None:
        """Move a customer to another plan."""
        customer: Customer = self.repository.get(customer_id)
        customer.change_plan(plan)
        self.save(customer)


class NewCustomer(BaseModel):
    """Who to welcome."""

    customer_id: str
    name: str = Field(min_length=1)
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    plan: str


class Onboarding(Saga[NewCustomer]):
    """Send the welcome email, then the getting-started guide; free plans get neither."""

    triggers = [
        on_change(
            Customers,
            Customer.Registered,
            when=lambda registered: registered.plan != "free",
            input=lambda registered: NewCustomer(
                customer_id=str(registered.originator_id),
                name=registered.name,
                email=registered.email,
                plan=registered.plan,
            ),
        )
    ]

    @step(retry=MAIL_RETRY)
    def welcome(self, customer: NewCustomer) -> Message:
        return SERVICES.mail.send(customer.email, f"Welcome, {customer.name}", key=self.idempotency_key)

    @step(retry=MAIL_RETRY)
    def guide(self, customer: NewCustomer) -> Message:
        return SERVICES.mail.send(customer.email, f"Getting started with {customer.plan}", key=self.idempotency_key)
