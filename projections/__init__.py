"""Read models built from the saga histories; they read events and never write them.

``Projection`` is the base of the read models users write (kept exactly once from the log by
``saga projections run``); ``StatusProjection`` rebuilds the engine's own status table.
"""

from orchestrator.following import Change
from projections.base import Projection, Rows
from projections.status import Progress, StatusProjection

__all__ = ["Change", "Progress", "Projection", "Rows", "StatusProjection"]
