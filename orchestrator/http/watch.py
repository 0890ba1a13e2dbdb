"""Long polls without a busy loop: requests that wait for a saga to end are woken when sagas may
have changed, by the storage waker (another process wrote: LISTEN/NOTIFY, or SQLite's
``data_version``) or by this process's own writes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from orchestrator.repository import Repository
from orchestrator.storage import Waker

T = TypeVar("T")
RECHECK = 1.0
"""Longest a waiter sleeps between two looks, in case a wake-up was missed (the waker is a shortcut)."""


class Changes:
    """A wake-up that waiting requests share; ``start`` inside the event loop, ``stop`` at shutdown."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event = asyncio.Event()
        self.waker: Waker | None = None

    def start(self) -> None:
        """Begin watching (call from the running event loop)."""
        self.loop = asyncio.get_running_loop()
        self.repository.add_waker(self.changed)
        self.waker = self.repository.index.waker(self.changed)
        if self.waker is not None:
            self.waker.start()

    def stop(self) -> None:
        """Stop watching."""
        self.repository.remove_waker(self.changed)
        if self.waker is not None:
            self.waker.stop()

    def changed(self) -> None:
        """Something may have changed (called from any thread)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        event, self.event = self.event, asyncio.Event()
        event.set()

    async def until(self, check: Callable[[], Awaitable[T | None]], timeout: float) -> T | None:
        """Await ``check()`` until it returns something, or ``timeout`` seconds pass (then ``None``)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.event
            found = await check()
            left = deadline - time.monotonic()
            if found is not None or left <= 0:
                return found
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(left, RECHECK))
