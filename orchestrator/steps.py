"""The parts a saga is made of: ``@step`` (with ``.compensate``), ``wait_for``, and what an attempt sees.

A step is checked when it is declared (its retry policy, its timeout); ``definition.py`` checks
how the steps of one saga fit together when the class is created.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, get_type_hints, overload

from pydantic import TypeAdapter

from orchestrator.errors import DefinitionError
from orchestrator.retry import RetryPolicy, normalize_retry, to_seconds

if TYPE_CHECKING:
    from orchestrator.definition import Saga

Fn = Callable[..., Any]


def is_name(value: Any) -> bool:
    """A saga or event name: printable (no control characters), 1 to 200 characters."""
    return isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable() and bool(value.strip())


def _return_adapter(fn: Fn) -> TypeAdapter[Any]:
    try:
        hints = get_type_hints(fn)
    except Exception as error:  # an unresolvable forward reference
        raise DefinitionError(f"cannot resolve the annotations of {fn.__qualname__}: {error}") from error
    return TypeAdapter(hints.get("return", Any))


def _positive_seconds(value: float | timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        seconds = to_seconds(value)
    except TypeError as error:
        raise DefinitionError(f"{what}: {error}") from error
    if seconds <= 0:
        raise DefinitionError(f"{what} must be positive, not {value!r}")
    return seconds


class Compensation:
    """The undo of a step: what ``@<step>.compensate`` turns a method into."""

    def __init__(self, step: StepDef, fn: Fn, retry: RetryPolicy | None) -> None:
        self.step = step
        self.fn = fn
        self.own_retry = retry
        self.retry = retry or step.retry
        """The compensation's own policy, else its step's."""
        self.is_async = inspect.iscoroutinefunction(fn)


class StepDef:
    """A step of a saga: a method run at least once, its output recorded exactly once."""

    def __init__(self, fn: Fn, retry: RetryPolicy, timeout: float | None) -> None:
        if not callable(fn):
            raise DefinitionError(f"@step decorates a method, not {fn!r}")
        self.fn = fn
        self.name = fn.__name__
        self.retry = retry
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(fn)
        self.compensation: Compensation | None = None
        """Set on the saga class's own copy of the step, when the class is created."""
        self.origin: StepDef = self
        self._output: TypeAdapter[Any] | None = None

    @property
    def output(self) -> TypeAdapter[Any]:
        """Validates and serialises the step's output, following its return annotation."""
        if self._output is None:
            self._output = _return_adapter(self.fn)
        return self._output

    @overload
    def compensate(self, fn: Fn, /) -> Compensation: ...
    @overload
    def compensate(self, *, retry: Any = None) -> Callable[[Fn], Compensation]: ...

    def compensate(self, fn: Fn | None = None, /, *, retry: Any = None) -> Any:  # type: ignore[misc]
        """Declare the method that undoes this step (``@step.compensate`` or ``(retry=...)``).

        Nothing changes on this step object: the saga class being defined attaches the
        compensation to its own copy, so a subclass never alters its parent.
        """
        policy = normalize_retry(retry) if retry is not None else None

        def register(function: Fn) -> Compensation:
            return Compensation(self, function, policy)

        return register if fn is None else register(fn)

    def with_compensation(self, compensation: Compensation) -> StepDef:
        """A copy of this step that ``compensation`` undoes."""
        clone = copy.copy(self)
        clone.compensation = Compensation(clone, compensation.fn, compensation.own_retry)
        return clone


@dataclass(frozen=True)
class WaitDef:
    """A durable wait for an event sent with ``Orchestrator.send``; no worker is busy meanwhile."""

    event: str
    timeout: float | None
    on_timeout: Literal["compensate", "continue"]
    name: str = ""


def wait_for(
    event: str,
    *,
    timeout: float | timedelta | None = None,
    on_timeout: Literal["compensate", "continue"] = "compensate",
) -> WaitDef:
    """Park the saga until ``event`` is sent to it, or until ``timeout`` passes.

    On timeout the saga compensates, or carries on when ``on_timeout="continue"``.
    """
    if not is_name(event):
        raise DefinitionError(f"wait_for needs an event name (printable, 1 to 200 characters), not {event!r}")
    if on_timeout not in ("compensate", "continue"):
        raise DefinitionError(f"on_timeout must be 'compensate' or 'continue', not {on_timeout!r}")
    return WaitDef(event, _positive_seconds(timeout, f"wait_for({event!r}) timeout"), on_timeout)


@overload
def step(fn: Fn, /) -> StepDef: ...
@overload
def step(*, retry: Any = None, timeout: float | timedelta | None = None) -> Callable[[Fn], StepDef]: ...


def step(fn: Fn | None = None, /, *, retry: Any = None, timeout: float | timedelta | None = None) -> Any:
    """Declare a step; ``@step`` and ``@step(retry=..., timeout=...)`` are both accepted.

    ``retry`` is a ``RetryPolicy``, an int (max attempts) or a dict of its fields; ``timeout``
    is seconds or a ``timedelta`` after which an attempt counts as failed.
    """
    policy = normalize_retry(retry)
    seconds = _positive_seconds(timeout, "step timeout")

    def decorate(function: Fn) -> StepDef:
        return StepDef(function, policy, seconds)

    return decorate if fn is None else decorate(fn)


Node = StepDef | WaitDef


@dataclass
class StepContext:
    """What one attempt of a step or compensation sees as ``self`` (given by the worker)."""

    saga_id: str
    input: Any
    results: Mapping[str, Any]
    received: Mapping[str, Any]
    attempt: int
    idempotency_key: str
    log_context: dict[str, Any]
    emitted: list[dict[str, Any]] = field(default_factory=list)
    """Domain events the attempt emitted, recorded with its outcome if it succeeds."""
    orchestrator: Any = None
    """The orchestrator whose worker runs the attempt (for built-in sagas such as ``Retention``)."""


class Results(Mapping[str, Any]):
    """Earlier steps' outputs by step name, validated through each step's return annotation on access."""

    def __init__(self, saga: type[Saga[Any]], raw: Mapping[str, Any]) -> None:
        self._saga = saga
        self._raw = raw
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            value = self._raw[name]
            node = self._saga.step_map.get(name)
            self._cache[name] = value if node is None else node.output.validate_python(value)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return repr(dict(self.items()))
