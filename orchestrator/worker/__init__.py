"""Workers: the loop (``loop``), batched recording (``batch``), lease renewal (``leases``), the
attempts in flight (``attempts``) and running one attempt to an outcome (``execution``)."""

from orchestrator.worker.loop import Worker
from orchestrator.worker.state import SideTask

__all__ = ["SideTask", "Worker"]
