"""Read models built from the saga histories; they read events and never write them."""

from projections.status import Progress, StatusProjection

__all__ = ["Progress", "StatusProjection"]
