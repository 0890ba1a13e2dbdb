"""Fixtures shared by the suites: one database URL per backend, and a drain helper."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from orchestrator import Orchestrator, SagaStatus


def postgres_url() -> str | None:
    """The test PostgreSQL server: SAGA_TEST_DATABASE_URL, else the libpq PG* variables, else None."""
    url = os.environ.get("SAGA_TEST_DATABASE_URL")
    if url:
        return url
    if not any(key in os.environ for key in ("PGHOST", "PGDATABASE", "PGUSER")):
        return None
    user = quote(os.environ.get("PGUSER", "postgres"))
    password = os.environ.get("PGPASSWORD")
    auth = f"{user}:{quote(password)}" if password else user
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    return f"postgresql://{auth}@{host}:{port}/{os.environ.get('PGDATABASE', 'test')}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL URL; skips (or fails, with SAGA_REQUIRE_POSTGRES=1) when there is none."""
    url = postgres_url()
    required = os.environ.get("SAGA_REQUIRE_POSTGRES") == "1"
    if url is None:
        if required:
            pytest.fail("SAGA_REQUIRE_POSTGRES=1 but neither SAGA_TEST_DATABASE_URL nor PG* variables are set")
        pytest.skip("PostgreSQL tests need SAGA_TEST_DATABASE_URL or the PG* variables")
    import psycopg

    try:
        psycopg.connect(url.split("?")[0], connect_timeout=5).close()
    except psycopg.Error as error:
        if required:
            pytest.fail(f"PostgreSQL at {url} is required but unreachable: {error}")
        pytest.skip(f"PostgreSQL at {url} is unreachable: {error}")
    return url.split("?")[0]


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A PostgreSQL URL with a fresh schema of its own, dropped afterwards."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield f"{pg_server}?schema={schema}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One URL per backend: the contract suite runs on each."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sagas.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database that outlives one Orchestrator and that processes can share: a SQLite file or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("pg_url"))


def drain(orch: Orchestrator, *saga_ids: str, timeout: float = 20.0) -> list[SagaStatus]:
    """Run the worker in this process until every saga is terminal (waiting on timers as needed)."""
    deadline = time.monotonic() + timeout
    while True:
        orch.run_worker(wait=False, poll_interval=0.01)
        statuses = [orch.status(saga_id) for saga_id in saga_ids]
        if all(status.state.terminal for status in statuses):
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError(f"not terminal after {timeout} s: {[(s.saga_id, s.state) for s in statuses]}")
        time.sleep(0.01)
