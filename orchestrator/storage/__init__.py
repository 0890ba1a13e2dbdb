"""Storage: the port the engine uses, the URL that chooses a backend, and the backends."""

from orchestrator.storage.application import SagaApplication, is_transient, open_store, storage_error
from orchestrator.storage.ports import (
    APPLICATION_NAME,
    Claim,
    Delivery,
    IndexEntry,
    SagaIndex,
    StatusQuery,
    ThreadWaker,
    Waker,
)
from orchestrator.storage.urls import DEFAULT_DATABASE_URL, Database, parse_database_url

__all__ = [
    "APPLICATION_NAME",
    "DEFAULT_DATABASE_URL",
    "Claim",
    "Database",
    "Delivery",
    "IndexEntry",
    "SagaApplication",
    "SagaIndex",
    "StatusQuery",
    "ThreadWaker",
    "Waker",
    "is_transient",
    "open_store",
    "parse_database_url",
    "storage_error",
]
