"""Retry policies: backoff growth, the cap, jitter bounds, giving up, and the shorthands."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orchestrator.errors import DefinitionError, NonRetryable
from orchestrator.retry import RetryPolicy, normalize_retry, to_seconds


class PaymentDeclined(Exception):
    """A business error a policy lists as not worth retrying."""


class DeclinedForFraud(PaymentDeclined):
    """A subclass of a listed type: also not worth retrying."""


def test_defaults_are_the_documented_ones() -> None:
    """A bare policy has the defaults its docstrings promise."""
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_interval, policy.backoff) == (3, 1.0, 2.0)
    assert (policy.max_interval, policy.jitter, policy.non_retryable) == (60.0, 0.1, ())


def test_delay_grows_exponentially_without_jitter() -> None:
    """Without jitter the delay after attempt n is initial_interval * backoff ** (n - 1)."""
    policy = RetryPolicy(initial_interval=0.5, backoff=3.0, max_interval=1000, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 13.5, 40.5]


def test_delay_is_capped_at_max_interval() -> None:
    """Once the exponential passes max_interval the delay stays at the cap."""
    policy = RetryPolicy(initial_interval=1, backoff=2, max_interval=5, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_backoff_of_one_gives_a_constant_delay() -> None:
    """backoff=1 retries at a fixed interval."""
    policy = RetryPolicy(initial_interval=2, backoff=1, jitter=0)
    assert {policy.delay(n) for n in range(1, 10)} == {2.0}


def test_jitter_stays_within_its_fraction_and_spreads() -> None:
    """With jitter j every delay lies in base * [1 - j, 1 + j], and the delays actually differ."""
    policy = RetryPolicy(initial_interval=10, backoff=2, max_interval=100, jitter=0.25)
    rand = random.Random(1234)
    for attempt, base in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 100.0), (9, 100.0)]:
        delays = [policy.delay(attempt, rand) for _ in range(200)]
        assert all(base * 0.75 <= delay <= base * 1.25 for delay in delays)
        assert max(delays) - min(delays) > base * 0.25  # spread over a good part of the band, not a constant


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    """The same seed gives the same delays: the only randomness is the ``rand`` passed in."""
    policy = RetryPolicy(jitter=0.5)
    first = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    second = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    assert first == second


def test_full_jitter_never_gives_a_negative_delay() -> None:
    """jitter=1 can take the delay down to zero, never below."""
    policy = RetryPolicy(initial_interval=1, jitter=1.0)
    rand = random.Random(0)
    delays = [policy.delay(1, rand) for _ in range(500)]
    assert min(delays) >= 0.0
    assert max(delays) <= 2.0


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(min_value=0, max_value=100),
    extra=st.floats(min_value=0, max_value=1000),
    backoff=st.floats(min_value=1, max_value=10),
    jitter=st.floats(min_value=0, max_value=1),
    attempt=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_delay_is_always_within_the_capped_jitter_band(
    initial: float, extra: float, backoff: float, jitter: float, attempt: int, seed: int
) -> None:
    """For any valid policy the delay is non-negative and within the jitter band around the capped base."""
    policy = RetryPolicy(initial_interval=initial, max_interval=initial + extra, backoff=backoff, jitter=jitter)
    base = min(initial * backoff ** (attempt - 1), policy.max_interval)
    delay = policy.delay(attempt, random.Random(seed))
    slack = 1e-9 * (1 + base)  # float rounding only
    assert delay >= 0.0
    assert base * (1 - jitter) - slack <= delay <= base * (1 + jitter) + slack
    assert delay <= policy.max_interval * (1 + jitter) + slack


def test_intervals_accept_timedelta() -> None:
    """Interval fields take a timedelta as well as seconds."""
    policy = RetryPolicy(initial_interval=timedelta(milliseconds=250), max_interval=timedelta(minutes=2))
    assert (policy.initial_interval, policy.max_interval) == (0.25, 120.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"initial_interval": -1},
        {"max_interval": -1},
        {"backoff": 0.5},
        {"jitter": 1.5},
        {"initial_interval": 10, "max_interval": 5},
    ],
)
def test_invalid_policies_are_rejected(fields: dict[str, float]) -> None:
    """A policy that could not be followed fails validation when it is built."""
    with pytest.raises(ValidationError):
        RetryPolicy(**fields)


def test_policy_is_frozen() -> None:
    """A policy is immutable, so a saga's retries cannot be changed behind its back."""
    policy = RetryPolicy()
    with pytest.raises(ValidationError):
        policy.max_attempts = 10  # type: ignore[misc]


def test_gives_up_on_non_retryable() -> None:
    """NonRetryable (and its subclasses) ends the retries whatever the policy lists."""

    class Refused(NonRetryable):
        pass

    policy = RetryPolicy()
    assert policy.gives_up(NonRetryable("no"))
    assert policy.gives_up(Refused("no"))
    assert not policy.gives_up(ConnectionError("flaky"))


def test_gives_up_on_listed_types_and_their_subclasses() -> None:
    """Exception types in non_retryable end the retries at once; other errors are retried."""
    policy = RetryPolicy(non_retryable=(PaymentDeclined, KeyError))
    assert policy.gives_up(PaymentDeclined())
    assert policy.gives_up(DeclinedForFraud())
    assert policy.gives_up(KeyError("k"))
    assert not policy.gives_up(ValueError("v"))
    assert not RetryPolicy().gives_up(PaymentDeclined())


def test_normalize_none_is_the_default_policy() -> None:
    """retry=None means the default policy."""
    assert normalize_retry(None) == RetryPolicy()


def test_normalize_int_is_max_attempts() -> None:
    """retry=5 means five attempts with the other defaults."""
    assert normalize_retry(5) == RetryPolicy(max_attempts=5)


def test_normalize_dict_is_the_policy_fields() -> None:
    """A dict is the policy's fields."""
    policy = normalize_retry({"max_attempts": 4, "initial_interval": 0.5, "jitter": 0})
    assert policy == RetryPolicy(max_attempts=4, initial_interval=0.5, jitter=0)


def test_normalize_policy_is_returned_as_is() -> None:
    """A RetryPolicy passes through unchanged (the very same object)."""
    policy = RetryPolicy(max_attempts=7)
    assert normalize_retry(policy) is policy


@pytest.mark.parametrize("retry", [0, -1, {"max_attempts": 0}, {"initial_interval": -2}, {"max_interval": 0.1}])
def test_normalize_rejects_invalid_values(retry: object) -> None:
    """A shorthand that makes an invalid policy raises DefinitionError, not a bare ValidationError."""
    with pytest.raises(DefinitionError, match="bad retry policy"):
        normalize_retry(retry)


@pytest.mark.parametrize("retry", ["x", True, 2.5, [3]])
def test_normalize_rejects_other_types(retry: object) -> None:
    """Strings, bools, floats and lists are not retry shorthands."""
    with pytest.raises(DefinitionError, match="retry must be"):
        normalize_retry(retry)


def test_normalize_rejects_a_badly_typed_duration_as_definition_error() -> None:
    """A non-numeric interval in a retry dict raises DefinitionError like every other bad retry."""
    with pytest.raises(DefinitionError):
        normalize_retry({"initial_interval": "5"})


def test_normalize_rejects_unknown_fields() -> None:
    """A misspelt field (max_attempt) is an error, not silently the default policy."""
    with pytest.raises(DefinitionError):
        normalize_retry({"max_attempt": 5})


def test_to_seconds_accepts_numbers_and_timedeltas_only() -> None:
    """Durations are seconds (int or float) or a timedelta; bools and strings are refused."""
    assert to_seconds(3) == 3.0
    assert to_seconds(0.25) == 0.25
    assert to_seconds(timedelta(hours=1)) == 3600.0
    for bad in (True, "5", None):
        with pytest.raises(TypeError):
            to_seconds(bad)  # type: ignore[arg-type]
