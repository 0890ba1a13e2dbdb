"""The saga definition API: ``Saga[Input]``, with ``@step``, ``@<step>.compensate`` and ``wait_for``
(declared in ``steps.py``, re-exported here).

A definition is checked when its class is created, so a mistake fails at import time
with a ``DefinitionError`` instead of half-way through a saga in production.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

import structlog
from pydantic import BaseModel, ValidationError

from orchestrator.domain import check_triggers
from orchestrator.errors import DefinitionError
from orchestrator.limits import Limits
from orchestrator.safety import JSON_OBJECT, problems
from orchestrator.steps import (
    Compensation,
    Fn,
    Node,
    Results,
    StepContext,
    StepDef,
    WaitDef,
    is_name,
    step,
    wait_for,
)

__all__ = ["Compensation", "Node", "Results", "Saga", "StepContext", "StepDef", "WaitDef", "step", "wait_for"]

InputT = TypeVar("InputT", bound=BaseModel)


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
    search: ClassVar[list[str]] = []
    """Input fields the list filters can match (``orch.list(search={"employee": "ada"})``)."""
    schedules: ClassVar[list[Any]] = []
    """When the clock starts this saga: ``[cron("0 2 * * *", tz="Europe/Berlin", input=...)]``."""
    limits: ClassVar[Any] = None
    """How many run at once and how fast they start: ``Limits(max_running=10, per=..., starts_per_second=50)``."""
    triggers: ClassVar[list[Any]] = []
    """Domain events that start this saga: ``[on(ClaimSubmitted, when=..., input=...)]``."""
    on_finished: ClassVar[Any] = None
    """Define ``def on_finished(self, status: SagaStatus)`` (or ``async def``) to be told, at least once,
    when a saga of this class ends; it runs in a worker, retried with backoff while it raises."""
    nodes: ClassVar[tuple[Node, ...]]

    step_map: ClassVar[dict[str, StepDef]]

    saga_id: str
    input: InputT
    results: Mapping[str, Any]
    received: dict[str, Any]
    attempt: int
    idempotency_key: str
    _context: StepContext

    @classmethod
    def _bind(cls, context: StepContext) -> Saga[Any]:
        """An instance of this saga for one attempt, carrying what the attempt may read."""
        instance = cls.__new__(cls)
        instance._context = context
        instance.saga_id = context.saga_id
        instance.input = context.input
        instance.results = context.results
        instance.received = dict(context.received)
        instance.attempt = context.attempt
        instance.idempotency_key = context.idempotency_key
        return instance

    @functools.cached_property
    def log(self) -> Any:
        """A structlog logger bound to the saga id, saga, step, attempt and worker."""
        return structlog.get_logger("sagaworks.step").bind(**self._context.log_context)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if Generic in cls.__bases__:  # an intermediate generic base, not a saga
            return
        cls.name = cls.__dict__.get("name", cls.__name__)
        if not is_name(cls.name):
            raise DefinitionError(f"{cls.__qualname__}.name must be a printable string of 1 to 200 characters")
        cls.input_model = _find_input_model(cls)
        unknown = [name for name in cls.search if name not in cls.input_model.model_fields]
        if not isinstance(cls.search, list | tuple) or unknown:
            raise DefinitionError(
                f"{cls.__qualname__}.search names input fields of {cls.input_model.__name__}; "
                f"not fields: {', '.join(map(repr, unknown)) or repr(cls.search)}"
            )
        cls.nodes = _collect_nodes(cls)
        cls.step_map = {node.name: node for node in cls.nodes if isinstance(node, StepDef)}
        cls.triggers = check_triggers(cls, cls.triggers)
        cls.schedules = _check_schedules(cls, cls.schedules)
        if cls.limits is not None and not isinstance(cls.limits, Limits):
            raise DefinitionError(f"{cls.__qualname__}.limits is a Limits(...), not {cls.limits!r}")
        if cls.on_finished is not None:
            _check_call(cls, cls.on_finished, "completion hook", ("self", "status"))

    def emit(self, event: BaseModel | dict[str, Any], *, name: str | None = None) -> None:
        """Record a domain event atomically with this step's outcome (dropped if the attempt fails)."""
        if isinstance(event, BaseModel):
            payload, default = event.model_dump(mode="json"), getattr(event, "event_name", type(event).__name__)
        elif isinstance(event, dict):
            payload, default = JSON_OBJECT.dump_python(event, mode="json"), "event"
        else:
            raise TypeError(f"emit() takes a pydantic model or a dict, not {event!r}")
        self._context.emitted.append({"name": name or default, "data": payload})

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


def _check_schedules(cls: type, schedules: Any) -> list[Any]:
    from orchestrator.schedules.spec import ScheduleSpec

    if not isinstance(schedules, list | tuple) or not all(isinstance(s, ScheduleSpec) for s in schedules):
        raise DefinitionError(f"{cls.__qualname__}.schedules is a list of cron(...), every(...) or once(...)")
    names = [s.name or str(i) for i, s in enumerate(schedules)]
    if len(set(names)) != len(names):
        raise DefinitionError(f"{cls.__qualname__} has two schedules named alike")
    model: type[BaseModel] = cls.input_model  # type: ignore[attr-defined]
    for spec in schedules:
        try:
            model.model_validate(spec.input)
        except ValidationError as error:
            problem = problems(error)
            raise DefinitionError(
                f"{cls.__qualname__}: a schedule's input does not fit {model.__name__}: {problem}"
            ) from None
    return list(schedules)


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
