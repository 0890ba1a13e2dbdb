"""Fresh databases for the bench, and the storage limit each one can reach.

PostgreSQL: a schema ``bench_<random>`` on the server, dropped afterwards. SQLite: a file in
a temporary directory, removed afterwards. Memory: nothing to create.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from orchestrator import ConfigurationError, Orchestrator
from orchestrator.safety import redact
from orchestrator.storage import parse_database_url

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite", "postgres", "memory")


def postgres_server(database: str | None) -> str:
    """The PostgreSQL server to bench on: ``--database``, else ``SAGA_DATABASE_URL`` if it is one, else local."""
    for url in (database, os.environ.get("SAGA_DATABASE_URL")):
        if url and urlsplit(url).scheme.lower() in ("postgresql", "postgres"):
            return url
    if database:
        raise ConfigurationError(f"--backend postgres needs a postgresql:// URL, not {database!r}")
    return DEFAULT_POSTGRES_URL


def with_schema(url: str, schema: str) -> str:
    """The URL with its ``schema`` query parameter set (other parameters, such as pool sizes, kept)."""
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "schema"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))


@contextmanager
def fresh_database(backend: str, database: str | None = None) -> Iterator[str]:
    """Yield the URL of an empty database of ``backend``; it is removed on exit."""
    if backend == "memory":
        yield "memory://"
    elif backend == "sqlite":
        directory = tempfile.mkdtemp(prefix="saga-bench-")
        try:
            yield f"sqlite:///{os.path.join(directory, 'bench.db')}"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    elif backend == "postgres":
        url = with_schema(postgres_server(database), f"bench_{uuid.uuid4().hex[:10]}")
        try:
            yield url
        finally:
            try:
                drop_schema(url)
            except Exception as error:  # never hide the bench's own error behind a cleanup failure
                print(f"warning: could not drop the bench schema of {redact(url)}: {error}", file=sys.stderr)
    else:
        raise ConfigurationError(f"unknown backend {backend!r}; backends are {', '.join(BACKENDS)}")


def drop_schema(url: str) -> None:
    """Drop the PostgreSQL schema named in ``url`` with everything in it (through the library's pool)."""
    schema = parse_database_url(url).env["POSTGRES_SCHEMA"]
    if not schema.startswith("bench_"):
        raise ConfigurationError(f"refusing to drop schema {schema!r}: the bench only drops its own bench_* schemas")
    with Orchestrator(database=url) as orch:
        datastore: Any = getattr(orch.store.recorder, "datastore")  # noqa: B009 - not part of the recorder's type
        with datastore.transaction(commit=True) as curs:
            curs.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def analyze_status(orch: Orchestrator) -> bool:
    """Refresh the planner's statistics of the index and events tables, as autovacuum would have by now.

    Right after a bulk load PostgreSQL has none, and then plans a filtered, ordered page as
    a sort of every matching row (hundreds of ms with 200,000 rows) instead of an index scan.
    """
    if orch.database.kind == "memory":
        return False
    datastore: Any = getattr(orch.store.recorder, "datastore")  # noqa: B009 - not part of the recorder's type
    schema = parse_database_url(orch.database.url).env.get("POSTGRES_SCHEMA")
    events = getattr(orch.store.recorder, "events_table_name")  # noqa: B009 - as above
    with datastore.transaction(commit=True) as curs:
        if orch.database.is_postgres:
            for table in ("saga_status", "saga_work", events):
                curs.execute(f'ANALYZE "{schema}"."{table}"')
        else:
            curs.execute("ANALYZE")
    return True


def insert_commit_rate(url: str, connections: int, seconds: float) -> float | None:
    """Single-row INSERT+COMMIT transactions per second on ``connections`` connections (None for memory).

    Each connection (one thread each) inserts one 100-byte row per transaction into a scratch
    table for ``seconds``; the table is dropped afterwards.
    """
    db = parse_database_url(url)
    if db.kind == "memory":
        return None
    name = f"saga_bench_limit_{uuid.uuid4().hex[:8]}"
    if db.is_postgres:
        from orchestrator.storage.postgres import connect

        table = f'"{db.env.get("POSTGRES_SCHEMA", "public")}"."{name}"'
        return _commit_rate(
            lambda: connect(db.env),
            f"CREATE TABLE {table} (id bigserial PRIMARY KEY, data bytea NOT NULL)",
            [f"INSERT INTO {table} (data) VALUES (%s)"],  # autocommit: each insert commits
            f"DROP TABLE IF EXISTS {table}",
            connections,
            seconds,
        )
    path = db.env["SQLITE_DBNAME"]

    def sqlite_connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")  # the library's settings: WAL, autocommit, busy timeout
        return conn

    return _commit_rate(
        sqlite_connect,
        f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
        ["BEGIN IMMEDIATE", f"INSERT INTO {name} (data) VALUES (?)", "COMMIT"],
        f"DROP TABLE IF EXISTS {name}",
        connections,
        seconds,
    )


def _commit_rate(
    connect: Callable[[], Any], create: str, transaction: list[str], drop: str, connections: int, seconds: float
) -> float:
    """Run ``transaction`` (its one parameterised statement gets the payload) in a loop on each connection."""
    payload = b"x" * 100
    counts = [0] * connections
    ready = threading.Barrier(connections + 1)
    errors: list[BaseException] = []

    def run(index: int, conn: Any) -> None:
        try:
            ready.wait()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for statement in transaction:
                    conn.execute(statement, (payload,) if "INSERT" in statement else ())
                counts[index] += 1
        except BaseException as error:  # reported by the caller's thread
            errors.append(error)

    admin = connect()
    admin.execute(create)
    try:
        conns = [connect() for _ in range(connections)]
        try:
            threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(conns)]
            for thread in threads:
                thread.start()
            ready.wait()
            began = time.monotonic()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - began
        finally:
            for conn in conns:
                conn.close()
    finally:
        admin.execute(drop)
        admin.close()
    if errors:
        raise ConfigurationError(f"the insert+commit probe failed: {errors[0]}") from errors[0]
    return sum(counts) / elapsed
