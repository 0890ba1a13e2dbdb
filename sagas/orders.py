"""``FulfilOrder``: hold the stock, charge the card, ship the parcel.

A declined card or missing stock fails for good; the stock held is released and the charge
refunded, in reverse order. ``ship`` is an ``async def`` step, as a call to a carrier's web API
would be: the worker runs it on its event loop.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field, model_validator

from orchestrator import RetryPolicy, Saga, step
from sagas.services import SERVICES, Payment, Shipment, StockHold

ORDER_RETRY = RetryPolicy(max_attempts=4, initial_interval=0.05, backoff=2.0, max_interval=1)
"""Short intervals so that the demo and the tests are quick; a real service would wait seconds."""


class Item(BaseModel):
    """A line of an order; also accepts a ``(sku, qty)`` pair."""

    sku: str = Field(min_length=1)
    qty: int = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) == 2:
            return {"sku": value[0], "qty": value[1]}
        return value


class Order(BaseModel):
    """A customer's order."""

    order_id: str = Field(min_length=1)
    items: list[Item] = Field(min_length=1)
    amount: Decimal = Field(gt=0)
    address: str


class OrderShipped(BaseModel):
    """Domain event: the parcel left the warehouse."""

    order_id: str
    shipment_id: str


class FulfilOrder(Saga[Order]):
    """Hold the stock, charge the payment, ship; release and refund if a step fails for good."""

    @step(retry=ORDER_RETRY)
    def reserve_stock(self, order: Order) -> StockHold:
        units: Counter[str] = Counter()
        for item in order.items:
            units[item.sku] += item.qty
        return SERVICES.warehouse.hold(units, key=self.idempotency_key)

    @reserve_stock.compensate
    def release_stock(self, order: Order, hold: StockHold) -> None:
        SERVICES.warehouse.release(hold.id)

    @step(retry=ORDER_RETRY)
    def charge_payment(self, order: Order) -> Payment:
        # The key is stable across retries of this step, so a retry after a lost reply charges once.
        return SERVICES.payment.charge(order.amount, key=self.idempotency_key)

    @charge_payment.compensate
    def refund(self, order: Order, payment: Payment) -> None:
        SERVICES.payment.refund(payment.id)

    @step(retry=ORDER_RETRY, timeout=30)
    async def ship(self, order: Order) -> Shipment:
        shipment = await SERVICES.shipping.ship(order.order_id, order.address, key=self.idempotency_key)
        self.emit(OrderShipped(order_id=order.order_id, shipment_id=shipment.id))
        self.log.info("order shipped", order_id=order.order_id, shipment=shipment.id)
        return shipment
