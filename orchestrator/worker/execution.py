"""One attempt to an ``Outcome``: ``StepRunner`` runs attempts concurrently (``def`` steps on a
thread pool, ``async def`` steps on one event loop) and turns whatever they do into an outcome."""

from __future__ import annotations

import asyncio
import inspect
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from orchestrator.aggregate import Outcome, Work
from orchestrator.definition import StepContext, StepDef
from orchestrator.safety import clean_error, encode, one_line, unstorable

OnSuccess = Callable[[Any], Outcome]
GivesUp = Callable[[BaseException], bool]


MAX_TRACEBACK = 8000
"""Characters of a traceback kept in the history (its end, where the exception was raised)."""


def describe(error: BaseException) -> str:
    """One line naming the exception and its message, as recorded in the history (storable, capped)."""
    message = str(error).strip().splitlines()
    return clean_error(f"{type(error).__name__}: {message[0]}" if message else type(error).__name__)


def failure(error: BaseException, gives_up: GivesUp) -> Outcome:
    """The outcome of an attempt that raised ``error``; an unexpected one keeps its traceback."""
    if gives_up(error):
        return Outcome(error=describe(error), retryable=False)
    text = "".join(traceback.format_exception(error))
    if len(text) > MAX_TRACEBACK:
        text = "…" + text[-MAX_TRACEBACK:]
    return Outcome(error=describe(error), retryable=True, traceback=clean_error_text(text), exception=error)


def clean_error_text(text: str) -> str:
    """A multi-line text made storable (NUL and lone surrogates escaped), length kept."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def serialise(node: StepDef, work: Work, value: Any, context: StepContext, max_bytes: int) -> Outcome:
    """The outcome of an attempt that returned ``value``: its output as it will be stored, or a
    non-retryable failure saying why it cannot be (running the step again would not help)."""
    if work.kind == "compensation":
        return Outcome()
    try:
        valid = node.output.validate_python(value)
    except Exception as error:
        return Outcome(error=f"step returned an invalid output: {one_line(error)}", retryable=False)
    reason = unstorable(valid, "output")
    try:
        result = node.output.dump_python(valid, mode="json")
        reason = reason or unstorable(result, "output")  # what serialisers made of it (enums, keys)
        if reason is None:
            encode(result, "the output", max_bytes)
        for emitted in context.emitted:
            reason = reason or unstorable(emitted["name"], "an emitted event's name")
            reason = reason or unstorable(emitted["data"], f"emitted event {emitted['name']!r}")
            if reason is None:
                encode(emitted["data"], f"emitted event {emitted['name']!r}", max_bytes)
    except Exception as error:
        reason = reason or describe(error)
    if reason is not None:
        return Outcome(error=f"step returned an output that cannot be stored: {reason}", retryable=False)
    return Outcome(result=result, emitted=list(context.emitted))


@dataclass(frozen=True)
class Call:
    """One attempt to run: the function and its arguments, the log context, how to read its result."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    context: dict[str, Any]
    on_success: OnSuccess
    gives_up: GivesUp


class StepRunner:
    """Executes attempts and turns whatever they do into an ``Outcome``; never raises."""

    def __init__(self, concurrency: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="saga-step")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        context: dict[str, Any],
        on_success: OnSuccess,
        gives_up: GivesUp,
    ) -> Future[Outcome]:
        """Start ``fn(*args)``; the future resolves to its outcome."""
        call = Call(fn, args, context, on_success, gives_up)
        if inspect.iscoroutinefunction(fn):
            return asyncio.run_coroutine_threadsafe(self._run_async(call), self.loop)
        return self.pool.submit(self._run_sync, call)

    @staticmethod
    def _run_sync(call: Call) -> Outcome:
        with structlog.contextvars.bound_contextvars(**call.context):
            try:
                return call.on_success(call.fn(*call.args))
            except BaseException as error:  # SystemExit in a step fails the attempt, not the worker
                return failure(error, call.gives_up)

    @staticmethod
    async def _run_async(call: Call) -> Outcome:
        with structlog.contextvars.bound_contextvars(**call.context):
            try:
                return call.on_success(await call.fn(*call.args))
            except asyncio.CancelledError:
                raise  # the worker cancelled it (timeout); the outcome is already recorded
            except BaseException as error:
                return failure(error, call.gives_up)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop for ``async def`` steps, started on first use."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="saga-async", daemon=True)
                self._loop_thread.start()
            return self._loop

    def close(self) -> None:
        """Stop taking attempts; attempts still running (timed out ones) are abandoned."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._loop is not None:
                # Let cancelled (timed-out) tasks unwind before the loop goes, or asyncio
                # reports them as destroyed while pending.
                asyncio.run_coroutine_threadsafe(_cancel_pending(), self._loop).result(timeout=5)
                self._loop.call_soon_threadsafe(self._loop.stop)
                assert self._loop_thread is not None
                self._loop_thread.join(timeout=5)
                self._loop.close()
                self._loop = None


async def _cancel_pending() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
