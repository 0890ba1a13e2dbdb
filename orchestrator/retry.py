"""Retry policies: how often and how soon a failed step or compensation runs again."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from orchestrator.errors import DefinitionError, NonRetryable


def to_seconds(value: float | timedelta) -> float:
    """Normalise a duration given as seconds or a ``timedelta`` to seconds."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a duration must be seconds or a timedelta, not {value!r}")
    return float(value)


Seconds = Annotated[float, BeforeValidator(to_seconds), Field(ge=0)]


class RetryPolicy(BaseModel):
    """How a failed attempt is retried: exponential backoff with jitter, capped.

    The delay before attempt ``n + 1`` is
    ``min(initial_interval * backoff ** (n - 1), max_interval)``, spread by ``jitter``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=3, ge=1)
    """Attempts in all, the first included (default 3)."""
    initial_interval: Seconds = 1.0
    """Seconds before the first retry (default 1)."""
    backoff: float = Field(default=2.0, ge=1.0)
    """Factor applied to the interval after each retry (default 2)."""
    max_interval: Seconds = 60.0
    """Cap on the interval, in seconds (default 60)."""
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of the interval added or removed at random (default 0.1)."""
    non_retryable: tuple[type[BaseException], ...] = ()
    """Exception types that fail the attempt for good at once, like ``NonRetryable``."""

    @model_validator(mode="after")
    def _interval_cap(self) -> RetryPolicy:
        if self.max_interval < self.initial_interval:
            raise ValueError("max_interval must not be smaller than initial_interval")
        return self

    def delay(self, attempt: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one."""
        base = min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval)
        spread = base * self.jitter
        return max(0.0, base + (rand or random).uniform(-spread, spread))

    def gives_up(self, error: BaseException) -> bool:
        """Whether ``error`` ends the retries at once."""
        return isinstance(error, (NonRetryable, *self.non_retryable))


def normalize_retry(retry: Any) -> RetryPolicy:
    """Turn the shorthands accepted by ``@step(retry=...)`` into a ``RetryPolicy``.

    ``None`` is the default policy, an ``int`` is ``max_attempts``, a dict is the policy's fields.
    """
    try:
        if retry is None:
            return RetryPolicy()
        if isinstance(retry, RetryPolicy):
            return retry
        if isinstance(retry, int) and not isinstance(retry, bool):
            return RetryPolicy(max_attempts=retry)
        if isinstance(retry, dict):
            return RetryPolicy(**retry)
    except (TypeError, ValueError) as error:
        raise DefinitionError(f"bad retry policy {retry!r}: {error}") from error
    raise DefinitionError(f"retry must be a RetryPolicy, an int or a dict, not {retry!r}")
