"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis): no request,
however odd, gets a 5xx, and every answer matches what the document says."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from orchestrator import Orchestrator, Saga, step, wait_for
from orchestrator.http.app import create_app


class Parcel(BaseModel):
    recipient: str
    weight: int


class Deliver(Saga[Parcel]):
    search = ["recipient"]

    @step
    def send(self, parcel: Parcel) -> str:
        return f"sent to {parcel.recipient}"


class Signoff(Saga[Parcel]):
    @step
    def prepare(self, parcel: Parcel) -> int:
        return parcel.weight

    signed = wait_for("signed", timeout=3600)


# The schema is loaded when this module is imported (schemathesis' lazy ``from_fixture`` does not
# work with this pytest), so the app and its SQLite file are made here and removed at exit.
_FOLDER = Path(tempfile.mkdtemp(prefix="sagaworks-fuzz-"))
atexit.register(shutil.rmtree, _FOLDER, True)
ORCH = Orchestrator(sagas=[Deliver, Signoff], database=f"sqlite:///{_FOLDER / 'fuzz.db'}")
APP = create_app(ORCH)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Two saga ids in three are ones that exist, so events, cancels and retries meet real sagas too."""
    if not path_parameters or "saga_id" not in path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([None, "known", "waiting"]).map(
        lambda saga_id: path_parameters if saga_id is None else {**path_parameters, "saga_id": saga_id}
    )


@pytest.fixture(scope="module", autouse=True)
def sagas_to_find() -> Iterator[None]:
    """A few sagas the fuzzer's ids may hit; the orchestrator is closed after the module."""
    ORCH.start(Deliver, {"recipient": "ada", "weight": 1}, saga_id="known")
    ORCH.start(Signoff, {"recipient": "bob", "weight": 2}, saga_id="waiting")
    yield
    ORCH.close()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case: Any) -> None:
    """No generated request gets a 5xx, and every status, content type and body is the documented one."""
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )


def test_fuzzed_sagas_stay_consistent() -> None:
    """After the fuzzing, every saga's status matches its history and a worker runs them all without a problem."""
    ORCH.run_worker(wait=False, poll_interval=0.01)
    sagas = ORCH.list()
    assert {"known", "waiting"} <= {s.saga_id for s in sagas}
    assert sum(n for states in ORCH.counts().values() for n in states.values()) == len(sagas)
    for status in sagas:
        history = ORCH.history(status.saga_id)
        assert history[0].type == "SagaStarted", status.saga_id
        assert status.version == len(history), status.saga_id
        assert ORCH.status_at(status.saga_id, datetime.now(UTC)).state == status.state, status.saga_id
        assert status.problem is None, (status.saga_id, status.problem)
