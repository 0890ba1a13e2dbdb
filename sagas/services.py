"""Fake external services for the catalogue: in memory, thread-safe, idempotent, and able to misbehave.

Each service books at most once per idempotency key, counts its calls, writes what it did to a
shared ``Journal`` (so a test can check the order of undos across services), and injects the
faults its ``Faults`` ask for. Sagas reach them through the registry ``SERVICES``, which tests and
the demo reset with other faults. A real application would inject its own clients instead, built
at start-up from its settings; the sagas would read them from the same kind of registry.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import ClassVar, NamedTuple, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from orchestrator import NonRetryable


class ServiceUnavailable(ConnectionError):
    """A transient fault: the service did not answer, and asking again may work."""


class Faults(BaseModel):
    """The faults a fake service injects into its forward calls (undo calls always work)."""

    model_config = ConfigDict(frozen=True)

    transient_failures: int = Field(default=0, ge=0)
    """The first N calls raise ``ServiceUnavailable`` before doing anything (default 0)."""
    transient_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """After those, each call raises ``ServiceUnavailable`` with this probability (default 0)."""
    seed: int = 0
    """Seed of the random draws behind ``transient_rate``, so a run can be replayed (default 0)."""
    lost_replies: int = Field(default=0, ge=0)
    """The first N calls that do the work then raise ``ServiceUnavailable``, as if the reply were lost."""
    permanent: bool = False
    """Every new request is refused with ``NonRetryable`` ("no rooms", "card declined"...)."""
    refused: frozenset[str] = frozenset()
    """Bookings of these items are refused with ``NonRetryable`` (a sold-out flight, say)."""


class Entry(NamedTuple):
    """One thing a service did."""

    service: str
    action: str
    ref: str


class Journal:
    """What every service did, in order across services."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._lock = threading.Lock()

    def add(self, service: str, action: str, ref: str) -> None:
        """Append an entry."""
        with self._lock:
            self._entries.append(Entry(service, action, ref))

    def entries(self, action: str | None = None) -> list[Entry]:
        """The entries so far, optionally only those of one action."""
        with self._lock:
            return [entry for entry in self._entries if action is None or entry.action == action]


class Record(BaseModel):
    """Something a service did, under the idempotency key of the request that did it."""

    id: str
    key: str


R = TypeVar("R", bound=Record)


class Reservation(Record):
    """A hotel room, a rental car or a flight seat."""

    item: str


class StockHold(Record):
    """Units of stock set aside for an order, by SKU."""

    items: dict[str, int]


class Payment(Record):
    """Money moved: a card charge or an expense payout."""

    amount: Decimal


class Claim(Record):
    """An expense claim recorded in the ledger."""

    employee: str
    amount: Decimal


class Message(Record):
    """An email handed to the mail service."""

    to: str
    subject: str


class Shipment(Record):
    """A parcel handed to the carrier."""

    order_id: str
    address: str


class FakeService:
    """The plumbing every fake shares: a lock, call counts, idempotency keys, faults and the journal."""

    name: ClassVar[str] = "service"
    refusal: ClassVar[str] = "request refused"

    def __init__(self, faults: Faults | None = None, journal: Journal | None = None) -> None:
        self.faults = faults or Faults()
        self.journal = journal or Journal()
        self.calls: Counter[str] = Counter()
        """Calls by action, failed ones included."""
        self.records: dict[str, Record] = {}
        """What was done, by id: one record per idempotency key."""
        self.undone: list[str] = []
        """Ids of the records cancelled, refunded, released..., in order."""
        self._lock = threading.Lock()
        self._random = random.Random(self.faults.seed)
        self._failures_left = self.faults.transient_failures
        self._lost_left = self.faults.lost_replies
        self._by_key: dict[str, Record] = {}
        self._ids = itertools.count(1)

    def _once(self, action: str, key: str, make: Callable[[str], R]) -> R:
        """Do ``action`` once per idempotency key; ``make`` does it, given the new record's id."""
        with self._lock:
            self.calls[action] += 1
            if self._failures_left > 0 or self._random.random() < self.faults.transient_rate:
                self._failures_left = max(0, self._failures_left - 1)
                raise ServiceUnavailable(f"{self.name} is unavailable, try again")
            if key in self._by_key:
                return cast(R, self._by_key[key])  # a key is only ever used for one action
            if self.faults.permanent:
                raise NonRetryable(f"{self.name}: {self.refusal}")
            record = make(f"{self.name}-{next(self._ids)}")
            self.records[record.id] = self._by_key[key] = record
            self.journal.add(self.name, action, record.id)
            if self._lost_left > 0:
                self._lost_left -= 1
                raise ServiceUnavailable(f"{self.name} did {action} {record.id} but the reply was lost")
            return record

    def _undo(self, action: str, ref: str, then: Callable[[Record], None] | None = None) -> None:
        """Undo a record by id, then call ``then`` on it; undoing it again changes nothing."""
        with self._lock:
            self.calls[action] += 1
            record = self.records.get(ref)
            if record is None:
                raise NonRetryable(f"{self.name} has no record {ref!r}")
            if ref in self.undone:
                return  # compensations run at least once, so a repeat must be harmless
            self.undone.append(ref)
            self.journal.add(self.name, action, ref)
            if then is not None:
                then(record)


class BookingService(FakeService):
    """Hotel rooms, rental cars or flight seats: reserve under an idempotency key, cancel by id."""

    def reserve(self, item: str, *, key: str) -> Reservation:
        """Hold ``item``; the same ``key`` returns the same reservation."""
        if item in self.faults.refused:
            with self._lock:
                self.calls["reserve"] += 1
            raise NonRetryable(f"{self.name}: {self.refusal} ({item})")
        return self._once("reserve", key, lambda ref: Reservation(id=ref, item=item, key=key))

    def cancel(self, reservation_id: str) -> None:
        """Release a reservation."""
        self._undo("cancel", reservation_id)


class HotelService(BookingService):
    """Hotel rooms."""

    name = "hotel"
    refusal = "no rooms"


class CarService(BookingService):
    """Rental cars."""

    name = "car"
    refusal = "no cars left"


class FlightService(BookingService):
    """Flight seats."""

    name = "flight"
    refusal = "sold out"


class PaymentService(FakeService):
    """Card payments: charge under an idempotency key, refund by id."""

    name = "payment"
    refusal = "card declined"

    def charge(self, amount: Decimal, *, key: str) -> Payment:
        """Take ``amount`` from the customer's card."""
        return self._once("charge", key, lambda ref: Payment(id=ref, amount=amount, key=key))

    def refund(self, payment_id: str) -> None:
        """Give the money back."""
        self._undo("refund", payment_id)


DEFAULT_STOCK: Mapping[str, int] = {"book": 10, "lamp": 3, "chair": 4}


class WarehouseService(FakeService):
    """Stock: hold units for an order, and release them."""

    name = "warehouse"
    refusal = "warehouse closed"

    def __init__(
        self, faults: Faults | None = None, journal: Journal | None = None, stock: Mapping[str, int] = DEFAULT_STOCK
    ) -> None:
        super().__init__(faults, journal)
        self.stock = dict(stock)
        """Units on the shelves by SKU, held ones excluded."""

    def hold(self, items: Mapping[str, int], *, key: str) -> StockHold:
        """Set ``items`` (units by SKU) aside; ``NonRetryable`` when one is out of stock."""

        def make(ref: str) -> StockHold:
            short = sorted(sku for sku, qty in items.items() if self.stock.get(sku, 0) < qty)
            if short:
                raise NonRetryable(f"out of stock: {', '.join(short)}")
            for sku, qty in items.items():
                self.stock[sku] -= qty
            return StockHold(id=ref, items=dict(items), key=key)

        return self._once("hold", key, make)

    def release(self, hold_id: str) -> None:
        """Put held stock back on the shelves."""

        def restock(hold: Record) -> None:
            assert isinstance(hold, StockHold)
            for sku, qty in hold.items.items():
                self.stock[sku] += qty

        self._undo("release", hold_id, restock)


class ShippingService(FakeService):
    """The carrier, reached through an ``async`` client as a web API would be."""

    name = "shipping"
    refusal = "address not served"

    async def ship(self, order_id: str, address: str, *, key: str, latency: float = 0.01) -> Shipment:
        """Hand a parcel to the carrier, after ``latency`` seconds of network."""
        await asyncio.sleep(latency)
        return self._once("ship", key, lambda ref: Shipment(id=ref, order_id=order_id, address=address, key=key))


class LedgerService(FakeService):
    """The expenses ledger: record claims, withdraw them, pay them out and reverse payouts."""

    name = "ledger"
    refusal = "ledger closed for the month"

    def submit(self, employee: str, amount: Decimal, *, key: str) -> Claim:
        """Record a claim."""
        return self._once("submit", key, lambda ref: Claim(id=ref, employee=employee, amount=amount, key=key))

    def withdraw(self, claim_id: str) -> None:
        """Strike a claim from the ledger."""
        self._undo("withdraw", claim_id)

    def pay_out(self, claim_id: str, amount: Decimal, *, key: str) -> Payment:
        """Pay a recorded, not withdrawn, claim to the employee."""

        def make(ref: str) -> Payment:
            if claim_id not in self.records or claim_id in self.undone:
                raise NonRetryable(f"ledger has no open claim {claim_id!r}")
            return Payment(id=ref, amount=amount, key=key)

        return self._once("pay_out", key, make)

    def reverse(self, payment_id: str) -> None:
        """Claw a payout back."""
        self._undo("reverse", payment_id)


class MailService(FakeService):
    """Outgoing email: send under an idempotency key (a message cannot be unsent)."""

    name = "mail"
    refusal = "mailbox does not exist"

    def send(self, to: str, subject: str, *, key: str) -> Message:
        """Send one message."""
        return self._once("send", key, lambda ref: Message(id=ref, to=to, subject=subject, key=key))


class Services:
    """The registry the catalogue's sagas call: one instance of each fake, sharing one journal."""

    def __init__(self) -> None:
        self.reset()

    def reset(
        self,
        *,
        hotel: Faults | None = None,
        car: Faults | None = None,
        flight: Faults | None = None,
        payment: Faults | None = None,
        warehouse: Faults | None = None,
        shipping: Faults | None = None,
        ledger: Faults | None = None,
        mail: Faults | None = None,
        stock: Mapping[str, int] = DEFAULT_STOCK,
    ) -> None:
        """Replace every service by a fresh one, with the faults given (none by default)."""
        self.journal = Journal()
        self.hotel = HotelService(hotel, self.journal)
        self.car = CarService(car, self.journal)
        self.flight = FlightService(flight, self.journal)
        self.payment = PaymentService(payment, self.journal)
        self.warehouse = WarehouseService(warehouse, self.journal, stock)
        self.shipping = ShippingService(shipping, self.journal)
        self.ledger = LedgerService(ledger, self.journal)
        self.mail = MailService(mail, self.journal)


SERVICES = Services()
"""The services the catalogue's sagas use; ``SERVICES.reset(flight=Faults(permanent=True))`` swaps faults."""
