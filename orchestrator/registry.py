"""The saga registry: saga names to classes, with what the engine derives from each class.

Sagas are registered explicitly (``Orchestrator(sagas=[...])``), never by importing a module.
For a saga already running when its class changes, the plan recorded in its ``SagaStarted``
decides its steps, their order, attempt limits and timeouts; the code running now supplies the
steps' bodies, retry delays and non-retryable exception types (which no history can hold).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from orchestrator.definition import Saga, StepDef
from orchestrator.errors import DefinitionError, InvalidInput, UnknownSaga
from orchestrator.machine import PlanNode
from orchestrator.retry import RetryPolicy
from orchestrator.safety import encode, one_line, short, unstorable

SagaRef = type[Saga[Any]] | str
Policies = dict[tuple[str, str], RetryPolicy]
"""The retry policy of every step and compensation of one saga, keyed by (kind, name)."""


def plan_of(saga: type[Saga[Any]]) -> list[PlanNode]:
    """The plan recorded in ``SagaStarted``: the saga's nodes in declaration order."""
    plan: list[PlanNode] = []
    for node in saga.nodes:
        if isinstance(node, StepDef):
            compensation = node.compensation
            plan.append(
                PlanNode(
                    name=node.name,
                    max_attempts=node.retry.max_attempts,
                    timeout=node.timeout,
                    compensable=compensation is not None,
                    compensation_max_attempts=compensation.retry.max_attempts if compensation else 1,
                )
            )
        else:
            plan.append(
                PlanNode(
                    name=node.name, kind="wait", event=node.event, timeout=node.timeout, on_timeout=node.on_timeout
                )
            )
    return plan


def search_values(saga: type[Saga[Any]], payload: dict[str, Any]) -> dict[str, Any]:
    """The saga's searchable input fields (``search = [...]`` on its class) and their values.

    Scalars are kept as they are; anything else is kept as its JSON text, so it can still be
    matched exactly.
    """
    values: dict[str, Any] = {}
    for name in saga.search:
        value = payload.get(name)
        if value is None or isinstance(value, str | int | float | bool):
            values[name] = value
        else:
            values[name] = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return values


def policies_of(saga: type[Saga[Any]]) -> Policies:
    """The retry policy of every step and compensation, keyed by (kind, name)."""
    policies: Policies = {}
    for node in saga.steps():
        policies[("step", node.name)] = node.retry
        if node.compensation is not None:
            policies[("compensation", node.name)] = node.compensation.retry
    return policies


def validate_input(saga: type[Saga[Any]], data: BaseModel | dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """The input as JSON-native data, after validation by the saga's input model.

    What the model accepts must come back from storage as it went in: a NUL character, a NaN,
    an integer beyond 64 bits, or more than ``max_bytes`` of JSON is refused here.
    """
    model = saga.input_model
    try:
        if isinstance(data, model):
            valid = data
        elif isinstance(data, BaseModel):
            valid = model.model_validate(data.model_dump())
        elif isinstance(data, dict):
            valid = model.model_validate(data)
        else:
            raise InvalidInput(f"{saga.name} takes a {model.__name__} or a dict as input, not {short(data)}")
    except ValidationError as error:
        raise InvalidInput(f"invalid input for {saga.name}: {one_line(error)}") from None
    if reason := unstorable(valid):
        raise InvalidInput(f"invalid input for {saga.name}: {reason}")
    payload = valid.model_dump(mode="json")
    # Serialisers (enums, extra fields, custom ones) may produce text the model itself did not hold.
    if reason := unstorable(payload):
        raise InvalidInput(f"invalid input for {saga.name}: {reason}")
    encode(payload, f"the input of {saga.name}", max_bytes)
    try:  # what is stored must load again, or every later step would fail on it
        model.model_validate(payload)
    except ValidationError as error:
        raise InvalidInput(
            f"invalid input for {saga.name}: it does not survive storage as JSON: {one_line(error)}"
        ) from None
    return payload


class Registry:
    """The sagas an orchestrator knows, by name, with their retry policies."""

    def __init__(self, sagas: Iterable[type[Saga[Any]]] = ()) -> None:
        self.sagas: dict[str, type[Saga[Any]]] = {}
        self.policies: dict[str, Policies] = {}
        for saga in sagas:
            self.register(saga)

    def register(self, saga: type[Saga[Any]]) -> None:
        """Add a saga class (a second class under a known name is refused)."""
        if not (isinstance(saga, type) and issubclass(saga, Saga) and hasattr(saga, "nodes")):
            raise DefinitionError(f"{saga!r} is not a saga class (subclass Saga[InputModel])")
        known = self.sagas.get(saga.name)
        if known is not None and known is not saga:
            raise DefinitionError(f"two sagas are named {saga.name!r}: {known.__qualname__} and {saga.__qualname__}")
        self.sagas[saga.name] = saga
        self.policies[saga.name] = policies_of(saga)

    def saga_class(self, saga: SagaRef) -> type[Saga[Any]]:
        """The registered class for a class or a name; ``UnknownSaga`` otherwise."""
        name = saga if isinstance(saga, str) else getattr(saga, "name", None)
        found = self.sagas.get(name) if isinstance(name, str) else None
        if found is None or (not isinstance(saga, str) and found is not saga):
            known = ", ".join(sorted(self.sagas)) or "none"
            raise UnknownSaga(
                f"unknown saga {short(saga if isinstance(saga, str) else repr(saga))}; registered sagas: {known}"
            )
        return found

    def __contains__(self, name: object) -> bool:
        return name in self.sagas

    def __iter__(self) -> Iterator[type[Saga[Any]]]:
        return iter(self.sagas.values())
