"""``BookTrip``: a hotel, a car and a flight, or none of them.

Each booking retries transient faults quickly; a booking that cannot be had at all (the
flight is sold out) raises ``NonRetryable``, and what was booked is cancelled in reverse order.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from orchestrator import RetryPolicy, Saga, step
from sagas.services import SERVICES, Reservation

BOOKING_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.05, backoff=2.0, max_interval=1)
"""Short intervals so that the demo and the tests are quick; a real service would wait seconds."""


class Trip(BaseModel):
    """What the traveller asked for."""

    traveller: str = Field(min_length=1)
    hotel: str
    nights: int = Field(default=1, ge=1)
    car: str
    flight: str


class BookTrip(Saga[Trip]):
    """Reserve the hotel, rent the car, book the flight; cancel the others if one fails for good."""

    @step(retry=BOOKING_RETRY, timeout=10)
    def reserve_hotel(self, trip: Trip) -> Reservation:
        return SERVICES.hotel.reserve(f"{trip.hotel}, {trip.nights} night(s)", key=self.idempotency_key)

    @reserve_hotel.compensate
    def cancel_hotel(self, trip: Trip, reservation: Reservation) -> None:
        SERVICES.hotel.cancel(reservation.id)

    @step(retry=BOOKING_RETRY, timeout=10)
    def rent_car(self, trip: Trip) -> Reservation:
        return SERVICES.car.reserve(trip.car, key=self.idempotency_key)

    @rent_car.compensate
    def cancel_car(self, trip: Trip, reservation: Reservation) -> None:
        SERVICES.car.cancel(reservation.id)

    @step(retry=BOOKING_RETRY, timeout=10)
    def book_flight(self, trip: Trip) -> Reservation:
        return SERVICES.flight.reserve(trip.flight, key=self.idempotency_key)

    @book_flight.compensate
    def cancel_flight(self, trip: Trip, reservation: Reservation) -> None:
        SERVICES.flight.cancel(reservation.id)
