"""What may be stored and printed: payload checks, saga id rules, escaping, short quotes, redaction."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import (
    ConfigurationError,
    InvalidInput,
    Orchestrator,
    Saga,
    Settings,
    UnexpectedEvent,
    step,
    wait_for,
)
from orchestrator.safety import check_saga_id, clean_error, escape, redact, short, unstorable
from orchestrator.storage import parse_database_url


class Inner(BaseModel):
    tags: list[str] = []


class Order(BaseModel):
    name: str = "x"
    inner: Inner = Inner()
    extra: dict[str, Any] = {}
    price: Decimal = Decimal("1.50")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"a": [1, {"b": "x\x00"}]}, "a[1].b: contains a NUL"),
        (Order(inner=Inner(tags=["ok", "n\x00"])), "inner.tags[1]: contains a NUL"),
        ({"k\x00": 1}, "key 'k\\x00': contains a NUL"),
        ([1.0, math.nan], "[1]: nan is not a finite number"),
        ({"n": -(2**64)}, "n: the integer is outside the 64-bit range"),
        ("\udcff", "lone surrogate"),
        (b"\x00", "NUL"),
    ],
)
def test_unstorable_names_where_the_bad_value_sits(value: Any, reason: str) -> None:
    """unstorable() finds NULs, non-finite floats, huge integers and surrogates, and says where."""
    found = unstorable(value)
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(
    "value", [{"a": [1, 2.5, None, True, "ü€𝄞"]}, Order(), 2**63 - 1, Decimal("NaN"), {"t": ("a", "b")}]
)
def test_storable_values_pass(value: Any) -> None:
    """Ordinary JSON values, models and the full Unicode range are storable."""
    assert unstorable(value) is None


@pytest.mark.parametrize(
    ("saga_id", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 201, "at most 200"),
        ("a\nb", "control characters"),
        ("a\x00b", "control characters"),
        ("a\x1b[31mb", "control characters"),
        (42, "is a string"),
    ],
)
def test_saga_id_rules(saga_id: Any, message: str) -> None:
    """Saga ids are 1 to 200 characters, not only spaces, with no control characters."""
    with pytest.raises(InvalidInput, match=message):
        check_saga_id(saga_id)


def test_saga_id_rules_allow_ordinary_ids() -> None:
    """Letters of any script, digits, punctuation and spaces inside an id are fine."""
    for saga_id in ["order-42", "Bestellung 7", "注文:9", "a" * 200]:
        assert check_saga_id(saga_id) == saga_id


def test_short_quotes_a_prefix_and_the_length() -> None:
    """short() quotes at most the limit and says how long the value was."""
    text = short("y" * 10_000)
    assert len(text) < 100
    assert "10,000 characters" in text


def test_escape_neutralises_terminal_sequences() -> None:
    """escape() turns escape sequences, newlines and bidi overrides into visible text."""
    assert escape("a\x1b[2Jb\nc\u202ed") == "a\\x1b[2Jb\\nc\\u202ed"
    assert escape("line1\nline2", newlines=True) == "line1\nline2"
    assert escape("plain ü") == "plain ü"


def test_clean_error_makes_any_text_storable() -> None:
    """clean_error() escapes NULs and surrogates and caps the length."""
    cleaned = clean_error("a\x00b\udcff" + "z" * 5000)
    assert unstorable(cleaned) is None
    assert cleaned.startswith("a\\x00b")
    assert len(cleaned) <= 2000


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:s3cret@host:5432/db",
        "postgresql://user:s%40cret@host/db",
        "postgresql://host/db?password=s3cret",
    ],
)
def test_redact_removes_passwords(url: str) -> None:
    """redact() hides a password in the user part or in a password= parameter."""
    shown = redact(url)
    assert "s3cret" not in shown
    assert "s%40cret" not in shown
    assert "***" in shown


def test_parsed_database_carries_no_password_where_it_can_be_printed() -> None:
    """A parsed URL's url and repr are redacted; the password reaches only the library's settings."""
    database = parse_database_url("postgresql://u:s3cret@h:5432/db")
    assert "s3cret" not in database.url
    assert "s3cret" not in repr(database)
    assert database.env["POSTGRES_PASSWORD"] == "s3cret"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:s3cret@h/db", "unsupported database URL"),
        ("postgresql://u:s3cret@h/db?pool_size=abc", "pool_size=.*integer"),
        ("postgresql://u:s3cret@h/db?schema=a;drop", "schema=.*identifier"),
        ("postgresql://u:s3cret@h/db?bogus=1", "unknown parameter 'bogus'"),
        ("postgresql://u:s3cret@h:99999/db", "cannot parse"),
    ],
)
def test_bad_database_urls_name_the_problem_without_the_password(url: str, message: str) -> None:
    """Every URL error names our own setting and never shows the password."""
    with pytest.raises(ConfigurationError, match=message) as caught:
        parse_database_url(url)
    assert "s3cret" not in str(caught.value)
    assert "POSTGRES_" not in str(caught.value)


class Note(BaseModel):
    text: str = ""


class Park(Saga[Note]):
    @step
    def first(self, note: Note) -> None: ...

    approval = wait_for("approved")


def test_commands_refuse_unstorable_payloads_and_write_nothing(database_url: str) -> None:
    """send() payloads, cancel reasons and ids follow the storage rules, on every backend."""
    with Orchestrator(sagas=[Park], database=database_url) as orch:
        saga_id = orch.start(Park, {})
        before = len(orch.history(saga_id))
        with pytest.raises(InvalidInput, match="NUL"):
            orch.send(saga_id, "approved", {"by": "a\x00"})
        with pytest.raises(InvalidInput, match="finite"):
            orch.send(saga_id, "approved", {"score": math.inf})
        with pytest.raises(InvalidInput, match="NUL"):
            orch.cancel(saga_id, "why\x00")
        with pytest.raises(InvalidInput, match="at most 2000"):
            orch.cancel(saga_id, "w" * 3000)
        with pytest.raises(InvalidInput, match="printable"):
            orch.send(saga_id, "appro\x00ved", {})
        with pytest.raises(InvalidInput, match="control characters"):
            orch.start(Park, {}, saga_id="bad\x00id")
        with pytest.raises(InvalidInput, match="at most 200"):
            orch.start_many(Park, [{}], saga_ids=["z" * 300])
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "x" * 150, {})
        assert len(orch.history(saga_id)) == before
        assert len(orch.list()) == 1


def test_input_size_limit_is_a_setting(database_url: str) -> None:
    """max_input_bytes caps the JSON size of an input and of event data, with a clear error."""
    settings = Settings.defaults().model_copy(update={"max_input_bytes": 2048})
    with Orchestrator(sagas=[Park], database=database_url, settings=settings) as orch:
        orch.start(Park, {"text": "a" * 1000})
        with pytest.raises(InvalidInput, match=r"limit is 2,048 \(SAGA_MAX_INPUT_BYTES\)"):
            orch.start(Park, {"text": "a" * 3000})
        saga_id = orch.start(Park, {})
        with pytest.raises(InvalidInput, match="limit"):
            orch.send(saga_id, "approved", {"blob": "b" * 3000})
        assert len(orch.list()) == 2


@pytest.mark.postgres
def test_a_refused_login_is_not_mistaken_for_a_database_that_is_away(pg_server: str) -> None:
    """A database that does not exist is a StorageError (fix the URL), a closed port StorageUnavailable (wait)."""
    from orchestrator.errors import StorageError, StorageUnavailable

    missing = pg_server.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(StorageError, match="refused the connection") as caught:
        Orchestrator(database=missing).open()
    assert not isinstance(caught.value, StorageUnavailable)
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        Orchestrator(database="postgresql://postgres@127.0.0.1:1/test").open()
