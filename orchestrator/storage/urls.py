"""``SAGA_DATABASE_URL``: which backend, with which library settings.

``memory://`` (the library's in-memory POPO store, for tests), ``sqlite:///path`` (one file,
WAL, the embedded default) or ``postgresql://user:password@host:port/db?schema=...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from orchestrator.errors import ConfigurationError
from orchestrator.safety import escape, redact, short

DEFAULT_DATABASE_URL = "sqlite:///sagaworks.db"


@dataclass(frozen=True)
class Database:
    """A parsed ``SAGA_DATABASE_URL``; its repr and ``url`` carry no password."""

    url: str
    """The URL with its password replaced by ``***``: safe to print."""
    kind: str
    """``memory``, ``sqlite`` or ``postgresql``."""
    env: dict[str, str] = field(repr=False)
    """The eventsourcing library's settings for it (with the password)."""

    @property
    def is_postgres(self) -> bool:
        """Whether the backend is PostgreSQL."""
        return self.kind == "postgresql"

    @property
    def durable(self) -> bool:
        """Whether what is written outlives the process (not so for ``memory://``)."""
        return self.kind != "memory"

    @property
    def secrets(self) -> list[str]:
        """Values that must never be printed (the password), for scrubbing error texts."""
        return [self.env.get("POSTGRES_PASSWORD", "")]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Query parameters of a postgresql:// URL: (library setting, rule, check, default).
_PG_OPTIONS: dict[str, tuple[str, str, Callable[[str], bool], str]] = {
    "schema": (
        "POSTGRES_SCHEMA",
        "a SQL identifier (letters, digits, _)",
        lambda v: _IDENTIFIER.fullmatch(v) is not None,
        "public",
    ),
    "pool_size": ("POSTGRES_POOL_SIZE", "an integer of at least 1", lambda v: v.isdigit() and int(v) >= 1, "2"),
    "max_overflow": ("POSTGRES_MAX_OVERFLOW", "an integer of at least 0", str.isdigit, "4"),
    # Never wait forever for the events table lock; a stuck writer surfaces as an error.
    "lock_timeout": ("POSTGRES_LOCK_TIMEOUT", "whole seconds, at least 1", lambda v: v.isdigit() and int(v) >= 1, "10"),
    "connect_timeout": (
        "POSTGRES_CONNECT_TIMEOUT",
        "whole seconds, at least 1",
        lambda v: v.isdigit() and int(v) >= 1,
        "10",
    ),
}


def _memory(url: str, parts: SplitResult, shown: str) -> Database:
    return Database(shown, "memory", {"PERSISTENCE_MODULE": "eventsourcing.popo"})


def _sqlite(url: str, parts: SplitResult, shown: str) -> Database:
    # As in SQLAlchemy: sqlite:///relative/path.db and sqlite:////absolute/path.db.
    if not url.lower().startswith("sqlite:///"):
        raise ConfigurationError(f"SQLite URLs look like sqlite:///sagaworks.db, not {escape(short(shown))}")
    path = unquote(url[len("sqlite:///") :].split("?")[0])
    if not path:
        raise ConfigurationError(f"SQLite URL without a file path: {escape(short(shown))} (try sqlite:///sagaworks.db)")
    if not Path(path).parent.exists():
        raise ConfigurationError(f"the directory of the SQLite file {escape(short(path))} does not exist")
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": path,
        "SQLITE_LOCK_TIMEOUT": "30",
        "APPLICATION_RECORDER_TOPIC": "orchestrator.storage.sqlite:SQLiteIndexRecorder",
    }
    return Database(shown, "sqlite", env)


def _postgres(url: str, parts: SplitResult, shown: str) -> Database:
    if not parts.path.strip("/"):
        raise ConfigurationError(f"PostgreSQL URL without a database name: {escape(short(shown))}")
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": "orchestrator.storage.postgres:PostgresIndexRecorder",
        "POSTGRES_DBNAME": unquote(parts.path.strip("/")),
        "POSTGRES_HOST": unquote(parts.hostname or "localhost"),
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or os.environ.get("PGUSER", "postgres")),
        "POSTGRES_PASSWORD": unquote(parts.password or os.environ.get("PGPASSWORD", "")),
        "POSTGRES_PRE_PING": "n",
        # Tables are created once, under an advisory lock (see postgres.py), never by each pool.
        "CREATE_TABLE": "n",
    }
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_PG_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"unknown parameter {escape(short(unknown[0]))} in the database URL; known: {', '.join(_PG_OPTIONS)}"
        )
    for key, (setting, rule, valid, default) in _PG_OPTIONS.items():
        value = query.get(key, default)
        if not valid(value):
            raise ConfigurationError(f"database URL parameter {key}={escape(short(value))}: must be {rule}")
        env[setting] = value
    return Database(shown, "postgresql", env)


BACKENDS: dict[str, Callable[[str, SplitResult, str], Database]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
}
"""URL scheme -> the backend's settings."""


def parse_database_url(url: str | None) -> Database:
    """Turn ``sqlite:///path``, ``postgresql://...`` or ``memory://`` into library settings."""
    url = url or DEFAULT_DATABASE_URL
    shown = redact(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port out of range raises here
    except ValueError as error:
        raise ConfigurationError(f"cannot parse the database URL {escape(short(shown))}: {error}") from None
    backend = BACKENDS.get(parts.scheme.lower())
    if backend is None:
        raise ConfigurationError(
            f"unsupported database URL {escape(short(shown))}: use sqlite:///path, postgresql://user@host/db or memory://"
        )
    return backend(url, parts, shown)
