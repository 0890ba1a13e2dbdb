"""The saga definition API: ``Saga[Input]``, ``@step``, ``@<step>.compensate`` and ``wait_for``.

A definition is checked when its class is created, so a mistake fails at import time
with a ``DefinitionError`` instead of half-way through a saga in production.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints, overload

import structlog
from pydantic import BaseModel, TypeAdapter

from orchestrator.errors import DefinitionError
from orchestrator.retry import RetryPolicy, normalize_retry, to_seconds

InputT = TypeVar("InputT", bound=BaseModel)
Fn = Callable[..., Any]
JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
"""Dumps a dict of JSON-compatible values (step events, sent events) to plain JSON data."""


def _is_name(value: Any) -> bool:
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
    if not _is_name(event):
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


class _Namespace(dict[str, Any]):
    """Class namespace that refuses to silently replace a step or a wait by a later one."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(self.get(key), StepDef | WaitDef):
            raise DefinitionError(f"duplicate step name {key!r}")
        super().__setitem__(key, value)


class _SagaMeta(type):
    @classmethod
    def __prepare__(cls, name: str, bases: tuple[type, ...], /, **kwargs: Any) -> dict[str, Any]:
        return _Namespace()

    def __new__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> type:
        return super().__new__(cls, name, bases, dict(namespace), **kwargs)


class Saga(Generic[InputT], metaclass=_SagaMeta):
    """Base class of saga definitions: ``class BookTrip(Saga[Trip]): ...``.

    During a step ``self`` carries ``saga_id``, ``input``, ``results``, ``received``,
    ``attempt``, ``idempotency_key``, ``emit(event)`` and ``log``.
    """

    name: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    nodes: ClassVar[tuple[Node, ...]]

    step_map: ClassVar[dict[str, StepDef]]

    saga_id: str
    input: InputT
    results: Mapping[str, Any]
    received: dict[str, Any]
    attempt: int
    idempotency_key: str
    _emitted: list[dict[str, Any]]
    _log_context: dict[str, Any]

    @functools.cached_property
    def log(self) -> Any:
        """A structlog logger bound to the saga id, saga, step, attempt and worker."""
        return structlog.get_logger("sagaworks.step").bind(**self._log_context)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if Generic in cls.__bases__:  # an intermediate generic base, not a saga
            return
        cls.name = cls.__dict__.get("name", cls.__name__)
        if not _is_name(cls.name):
            raise DefinitionError(f"{cls.__qualname__}.name must be a printable string of 1 to 200 characters")
        cls.input_model = _find_input_model(cls)
        cls.nodes = _collect_nodes(cls)
        cls.step_map = {node.name: node for node in cls.nodes if isinstance(node, StepDef)}

    def emit(self, event: BaseModel | dict[str, Any], *, name: str | None = None) -> None:
        """Record a domain event atomically with this step's outcome (dropped if the attempt fails)."""
        if isinstance(event, BaseModel):
            payload, default = event.model_dump(mode="json"), type(event).__name__
        elif isinstance(event, dict):
            payload, default = JSON_OBJECT.dump_python(event, mode="json"), "event"
        else:
            raise TypeError(f"emit() takes a pydantic model or a dict, not {event!r}")
        self._emitted.append({"name": name or default, "data": payload})

    @classmethod
    def steps(cls) -> list[StepDef]:
        """The steps in declaration order."""
        return list(cls.step_map.values())

    @classmethod
    def waits(cls) -> dict[str, WaitDef]:
        """The waits by event name."""
        return {node.event: node for node in cls.nodes if isinstance(node, WaitDef)}


def _find_input_model(cls: type) -> type[BaseModel]:
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Saga):
            args = get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                return args[0]
            raise DefinitionError(f"{cls.__qualname__}: Saga[...] takes a pydantic model, not {args!r}")
    inherited = getattr(cls, "input_model", None)
    if inherited is None:
        raise DefinitionError(f"{cls.__qualname__} must name its input model: class {cls.__name__}(Saga[MyInput])")
    return inherited  # type: ignore[no-any-return]


def _collect_nodes(cls: type) -> tuple[Node, ...]:
    nodes: list[Node] = list(getattr(cls, "nodes", ()))
    names = {node.name for node in nodes}
    compensations: list[Compensation] = []
    for attr, value in vars(cls).items():
        if isinstance(value, Compensation):
            compensations.append(value)
            continue
        if isinstance(value, WaitDef):
            value = WaitDef(value.event, value.timeout, value.on_timeout, attr)
            setattr(cls, attr, value)
        elif not isinstance(value, StepDef):
            continue
        if value.name != attr and isinstance(value, StepDef):
            raise DefinitionError(f"step {value.name!r} is bound to the attribute {attr!r}")
        if attr in names:
            raise DefinitionError(f"{cls.__qualname__}: duplicate step name {attr!r}")
        names.add(attr)
        nodes.append(value)
    undone: set[str] = set()
    for compensation in compensations:
        origin = compensation.step.origin
        index = next((i for i, n in enumerate(nodes) if isinstance(n, StepDef) and n.origin is origin), None)
        if index is None:
            raise DefinitionError(
                f"{cls.__qualname__}: compensation {compensation.fn.__name__!r} "
                f"undoes step {compensation.step.name!r}, which is not a step of this saga"
            )
        target = nodes[index]
        assert isinstance(target, StepDef)
        if target.name in undone:
            raise DefinitionError(f"{cls.__qualname__}: step {target.name!r} has two compensations")
        undone.add(target.name)
        nodes[index] = target.with_compensation(compensation)
        setattr(cls, target.name, nodes[index])
    steps = [node for node in nodes if isinstance(node, StepDef)]
    for node in steps:
        if node.origin is node or node.compensation is not None:
            _check_call(cls, node.fn, "step", ("self", "input"))
        if node.compensation is not None:
            _check_call(cls, node.compensation.fn, "compensation", ("self", "input", "result"))
    events = [node.event for node in nodes if isinstance(node, WaitDef)]
    if len(events) != len(set(events)):
        raise DefinitionError(f"{cls.__qualname__}: two wait_for() wait for the same event")
    if not steps:
        raise DefinitionError(f"{cls.__qualname__} has no @step")
    return tuple(nodes)


def _check_call(cls: type, fn: Fn, kind: str, params: tuple[str, ...]) -> None:
    """Refuse a method that the engine could not call as ``fn(self, input[, result])``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return
    try:
        signature.bind(*params)
    except TypeError as error:
        code = getattr(inspect.unwrap(fn), "__code__", None)
        where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
        raise DefinitionError(
            f"{cls.__qualname__}.{fn.__name__}{where}: a {kind} is called as "
            f"{fn.__name__}({', '.join(params)}), but its signature is {fn.__name__}{signature}: {error}"
        ) from None


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
