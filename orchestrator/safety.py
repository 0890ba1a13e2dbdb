"""What may be stored and what may be printed.

Everything a caller or a step hands the engine (inputs, event payloads, step outputs, reasons)
must round-trip exactly through every backend, or be refused before anything is written:
PostgreSQL's ``jsonb`` takes no NUL character, JSON has no NaN, orjson no integer beyond 64
bits and no lone surrogate. Everything the engine prints (errors, tables, headers) is short,
free of control characters, and carries no password.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from orchestrator.errors import InvalidInput

MAX_SAGA_ID_LENGTH = 200
"""Longest saga id, in characters."""
MAX_REASON_LENGTH = 2000
"""Longest cancel or resolve reason, in characters."""
MAX_ERROR_LENGTH = 2000
"""Longest error text recorded for an attempt."""
_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson encodes
JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
"""Dumps a dict of JSON-compatible values (event payloads, emitted events) to plain JSON data."""


def unstorable(value: Any, path: str = "") -> str | None:
    """Why ``value`` (input, output, payload; before JSON encoding) cannot be stored, or ``None``.

    The reason names where the offending value sits, e.g. ``items[2].name: contains a NUL``.
    """
    where = path or "the value"
    if isinstance(value, str):
        return _bad_text(value, where)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}: {value!r} is not a finite number (JSON has no NaN)"
    if isinstance(value, int):
        low, high = _INT_RANGE
        return None if low <= value <= high else f"{where}: the integer is outside the 64-bit range"
    if isinstance(value, bytes | bytearray):
        return f"{where}: contains a NUL character" if b"\x00" in value else None
    if isinstance(value, BaseModel):
        fields = dict(value.__dict__)
        fields.update(value.__pydantic_extra__ or {})
        return _first(fields.items(), path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _first(((f.name, getattr(value, f.name)) for f in dataclasses.fields(value)), path)
    if isinstance(value, Mapping):
        for key in value:
            if isinstance(key, str) and (reason := _bad_text(key, f"{path or 'a'} key {short(key)}")):
                return reason
        return _first(((str(k), v) for k, v in value.items()), path)
    if isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            if reason := unstorable(item, f"{path}[{index}]"):
                return reason
    return None


def _first(items: Any, path: str) -> str | None:
    for name, item in items:
        if reason := unstorable(item, f"{path}.{name}" if path else name):
            return reason
    return None


def _bad_text(text: str, where: str) -> str | None:
    if "\x00" in text:
        return f"{where}: contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where}: contains a lone surrogate (not valid Unicode)"
    return None


def encode(data: Any, what: str, max_bytes: int) -> bytes:
    """``data`` (JSON-native, already dumped) as stored JSON; ``InvalidInput`` if it cannot be stored."""
    try:
        encoded = orjson.dumps(data)
    except (TypeError, orjson.JSONEncodeError) as error:
        raise InvalidInput(f"{what} cannot be stored: {error}") from None
    if len(encoded) > max_bytes:
        raise InvalidInput(
            f"{what} is {len(encoded):,} bytes of JSON; the limit is {max_bytes:,} (SAGA_MAX_INPUT_BYTES)"
        )
    return encoded


def derived_id(*parts: str) -> str:
    """A saga id made of ``parts`` (a trigger and an event, say), joined by ``:``; one too long keeps
    its start and ends in a hash of the whole, so two different sources never share an id."""
    joined = ":".join(parts)
    if len(joined) <= MAX_SAGA_ID_LENGTH:
        return joined
    digest = hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{joined[: MAX_SAGA_ID_LENGTH - 42]}~{digest}"


def check_saga_id(saga_id: Any) -> str:
    """``saga_id`` if it follows the rules: a string of 1 to 200 characters, no control characters,
    not only spaces."""
    if not isinstance(saga_id, str):
        raise InvalidInput(f"a saga id is a string, not {type(saga_id).__name__}")
    if not saga_id.strip():
        raise InvalidInput("a saga id must not be empty or only spaces")
    if len(saga_id) > MAX_SAGA_ID_LENGTH:
        raise InvalidInput(
            f"a saga id has at most {MAX_SAGA_ID_LENGTH} characters; {short(saga_id)} has {len(saga_id):,}"
        )
    # isprintable() is false for every control character (and for some allowed ones): the quick check.
    if not saga_id.isprintable() and any(unicodedata.category(c) in ("Cc", "Cs") for c in saga_id):
        raise InvalidInput(f"a saga id must not contain control characters: {short(saga_id)}")
    return saga_id


def check_url(url: Any) -> str:
    """A notification URL: http or https, at most 2,000 characters, no control characters."""
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise InvalidInput(f"a notification URL is http:// or https://, not {short(url)}")
    if len(url) > 2000 or _bad_text(url, "url") or any(unicodedata.category(c) == "Cc" for c in url):
        raise InvalidInput(f"a notification URL has at most 2000 printable characters: {short(url)}")
    try:
        if not urlsplit(url).hostname:
            raise ValueError("no host")
    except ValueError as error:
        raise InvalidInput(f"not a usable URL: {short(url)} ({error})") from None
    return url


def check_text(text: Any, what: str, limit: int = MAX_REASON_LENGTH) -> str | None:
    """A free text (a reason): ``None`` or a storable string of at most ``limit`` characters."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidInput(f"{what} is a string, not {type(text).__name__}")
    if len(text) > limit:
        raise InvalidInput(f"{what} has at most {limit} characters, not {len(text):,}")
    if reason := _bad_text(text, what):
        raise InvalidInput(reason)
    return text


def clean_error(text: str) -> str:
    """An error text made storable: NUL characters and lone surrogates escaped, length capped."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape(text: str, *, newlines: bool = False) -> str:
    """``text`` safe for a terminal: control and bidi characters (and newlines, unless kept) escaped."""
    if not newlines:
        text = text.replace("\n", "\\n").replace("\t", "\\t")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(error: BaseException) -> str:
    """An error's message on one line (pydantic's span several), storable and cut to a readable length.

    A validation error reads ``field: what is wrong; ...`` (without the values: they may be secrets)."""
    text = problems(error) if isinstance(error, ValidationError) else " ".join(str(error).split())
    text = clean_error(text)
    return text if len(text) <= 500 else text[:499] + "…"


def problems(error: ValidationError) -> str:
    """A validation error's problems on one line, each as ``where: what`` (pydantic's ``Value error,``
    prefix of a validator's message left out)."""
    found = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or error.title
        found.append(f"{where}: {problem['msg'].removeprefix('Value error, ')}")
    return "; ".join(found)


def event_payload(data: Any, max_bytes: int) -> dict[str, Any]:
    """The JSON-native payload of an event sent to a saga (a dict or a model; ``None`` is empty)."""
    if data is None:
        return {}
    if not isinstance(data, BaseModel | dict):
        raise InvalidInput(f"event data is a dict or a pydantic model, not {short(data)}")
    if reason := unstorable(data):
        raise InvalidInput(f"event data cannot be stored: {reason}")
    try:
        dumped: dict[str, Any] = (
            data.model_dump(mode="json") if isinstance(data, BaseModel) else JSON_OBJECT.dump_python(data, mode="json")
        )
    except Exception as error:
        raise InvalidInput(f"event data must be JSON-compatible: {one_line(error)}") from None
    if reason := unstorable(dumped):
        raise InvalidInput(f"event data cannot be stored: {reason}")
    encode(dumped, "the event data", max_bytes)
    return dumped


def short(value: Any, limit: int = 60) -> str:
    """A quotable prefix of ``value`` for messages: its repr, cut at ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    quoted = repr(text[:limit])
    return quoted + (f"… ({len(text):,} characters)" if len(text) > limit else "")


def redact(url: str) -> str:
    """The URL without its password (in the user part or in a ``password=`` parameter)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an unparsable URL>"
    if password:
        netloc = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{netloc[0].partition(':')[0]}:***@{netloc[2]}", 1)
    for key, value in parse_qsl(parts.query):
        if key.lower() in ("password", "pass", "token") and value:
            url = url.replace(value, "***")
    return url


def redact_in(text: str, secrets: list[str]) -> str:
    """``text`` with every secret in ``secrets`` replaced by ``***`` (for errors that quote a connection)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
