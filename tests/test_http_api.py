"""The HTTP API through a real HTTP client (starlette's TestClient over the ASGI app), on every backend:
asynchronous request-reply, idempotency, problems for every bad request (with nothing written),
the bearer token, long polls, time travel, pages and filters, health and the access log."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr
from structlog.testing import capture_logs

from orchestrator import Orchestrator, Saga, step, wait_for
from orchestrator.http.app import create_app
from orchestrator.settings import Settings
from tests.conftest import drain

with warnings.catch_warnings():  # starlette's test client prefers httpx2 to the installed httpx
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKEN = "s3cret-t0ken"
LIMIT = 2048
JSON = {"Content-Type": "application/json"}


class Order(BaseModel):
    customer: str
    quantity: int
    weight: float = 1.0


class Ship(Saga[Order]):
    search = ["customer"]

    @step
    def pack(self, order: Order) -> str:
        return f"{order.quantity} packed"

    @step
    def send(self, order: Order) -> str:
        return f"sent to {order.customer}"


class Approve(Saga[Order]):
    @step
    def reserve(self, order: Order) -> str:
        return "reserved"

    approval = wait_for("approved", timeout=3600)

    @step
    def charge(self, order: Order) -> str:
        return "charged"


def settings(**overrides: Any) -> Settings:
    """Settings that ignore the environment, with the body limit small enough to test."""
    return Settings.defaults().model_copy(update={"max_body_bytes": LIMIT, **overrides})


@pytest.fixture
def orch(database_url: str) -> Iterator[Orchestrator]:
    """An orchestrator of Ship and Approve on each backend (memory, SQLite file, PostgreSQL)."""
    with Orchestrator(sagas=[Ship, Approve], database=database_url, settings=settings()) as orch:
        yield orch


@pytest.fixture
def client(orch: Orchestrator) -> Iterator[TestClient]:
    """An HTTP client of the app, its lifespan running."""
    with TestClient(create_app(orch)) as client:
        yield client


def written(orch: Orchestrator) -> list[tuple[str, int, int]]:
    """What storage holds: every saga's id, status version and history length."""
    return sorted((s.saga_id, s.version, len(orch.history(s.saga_id))) for s in orch.list())


def assert_problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    """``response`` is the RFC 9457 problem ``slug`` with ``status``; returns its document."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    return body


def order(customer: str = "ada", quantity: int = 1) -> dict[str, Any]:
    return {"customer": customer, "quantity": quantity}


# 1. Start, poll, complete


def test_start_poll_complete(client: TestClient, orch: Orchestrator) -> None:
    """A start answers 202 with Location and links; polls give 202 + Retry-After, then 200 once a worker ran it."""
    started = client.post("/sagas/Ship", json=order())
    assert started.status_code == 202
    body = started.json()
    saga_id = body["saga_id"]
    assert started.headers["location"] == f"/sagas/{saga_id}" == body["status_url"]
    assert started.headers["retry-after"] == "1"
    assert body["saga"] == "Ship"
    assert body["events_url"] == f"/sagas/{saga_id}/events/{{event}}"
    assert [s.saga_id for s in orch.list()] == [saga_id]

    polled = client.get(started.headers["location"])
    assert polled.status_code == 202
    assert polled.headers["retry-after"] == "1"
    assert polled.json()["state"] == "pending"

    drain(orch, saga_id)
    done = client.get(started.headers["location"])
    assert done.status_code == 200
    assert "retry-after" not in done.headers
    assert done.json()["state"] == "completed"
    assert done.json()["result"] == {"pack": "1 packed", "send": "sent to ada"}

    history = client.get(body["history_url"])
    assert history.status_code == 200
    assert history.json()[0]["type"] == "SagaStarted"
    assert history.json()[-1]["type"] == "SagaCompleted"
    timeline = client.get(body["timeline_url"])
    assert timeline.status_code == 200
    assert len(timeline.json()) >= 2

    key = "order 42?x=1%"  # reserved characters in an id come back percent-encoded, and that URL finds it
    keyed = client.post("/sagas/Ship", json=order(), headers={"Idempotency-Key": key})
    assert keyed.headers["location"] == "/sagas/order%2042%3Fx%3D1%25"
    assert client.get(keyed.headers["location"]).json()["saga_id"] == key


def test_an_id_with_a_slash_is_addressable(client: TestClient, orch: Orchestrator) -> None:
    """A saga id with '/' (which start() accepts) is reachable by its Location and its sub-resources."""
    started = client.post("/sagas/Approve", json=order(), headers={"Idempotency-Key": "tenant-7/order-42"})
    assert started.status_code == 202, started.text
    assert started.headers["location"] == "/sagas/tenant-7%2Forder-42"
    assert client.get(started.headers["location"]).json()["saga_id"] == "tenant-7/order-42"
    assert client.get(started.json()["history_url"]).json()[0]["type"] == "SagaStarted"
    cancelled = client.post(started.json()["cancel_url"], json={"reason": "test"})
    assert cancelled.status_code == 202, cancelled.text
    assert orch.status("tenant-7/order-42").state.value in ("compensating", "cancelled")


def test_plain_polls_answer_as_the_status_route_does(
    client: TestClient, orch: Orchestrator, subtests: pytest.Subtests
) -> None:
    """A plain poll, answered before FastAPI's routing, gets byte for byte what the status route answers."""
    done = client.post("/sagas/Ship", json=order()).json()
    drain(orch, done["saga_id"])
    pending = client.post("/sagas/Ship", json=order(), headers={"Idempotency-Key": "tenant-7/order 42?"})
    waiting = client.post("/sagas/Approve", json=order()).headers["location"]
    orch.run_worker(wait=False, poll_interval=0.01)
    assert client.get(waiting).json()["state"] == "waiting"
    for path in [
        done["status_url"],
        pending.headers["location"],
        waiting,
        "/sagas/nope",
        "/sagas/",
        "/sagas/a%2Fb",
        "/sagas/history",
    ]:
        with subtests.test(msg=path):
            plain, routed = client.get(path), client.get(f"{path}?via=route")  # a query takes the route
            assert (plain.status_code, plain.headers, plain.content) == (
                routed.status_code,
                routed.headers,
                routed.content,
            )


def test_only_plain_polls_take_the_shortcut() -> None:
    """GETs of a saga's status with no query and no Prefer take the shortcut; the rest go to the app's routes."""
    from orchestrator.http.polls import _plain_poll

    def scope(method: str, path: str, query: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = ()) -> Any:
        return {"type": "http", "method": method, "path": path, "query_string": query, "headers": list(headers)}

    assert _plain_poll(scope("GET", "/sagas/tenant/1")) == "tenant/1"
    assert _plain_poll(scope("GET", "/sagas/")) == ""
    for refused in [
        scope("POST", "/sagas/abc"),
        scope("HEAD", "/sagas/abc"),
        scope("GET", "/sagas"),
        scope("GET", "/sagas/counts"),
        scope("GET", "/sagas/abc/history"),
        scope("GET", "/sagas/abc/timeline"),
        scope("GET", "/sagas/abc", b"at=2024-01-01T00:00:00Z"),
        scope("GET", "/sagas/abc", headers=((b"prefer", b"wait=5"),)),
        scope("GET", "/ui/sagas/abc"),
        {**scope("GET", "/sagas/abc"), "root_path": "/api"},
        {"type": "websocket", "path": "/sagas/abc", "headers": []},
    ]:
        assert _plain_poll(refused) is None, refused


def test_event_then_complete(client: TestClient, orch: Orchestrator) -> None:
    """A waiting saga completes after POST /events/{event} (202) and a worker run; a second delivery is 409."""
    saga_id = client.post("/sagas/Approve", json=order()).json()["saga_id"]
    orch.run_worker(wait=False, poll_interval=0.01)
    assert client.get(f"/sagas/{saga_id}").json()["waiting_for"] == "approved"

    sent = client.post(f"/sagas/{saga_id}/events/approved", json={"by": "manager"})
    assert sent.status_code == 202, sent.text
    assert sent.json()["saga_id"] == saga_id
    before = written(orch)
    assert_problem(client.post(f"/sagas/{saga_id}/events/approved", json={}), 409, "unexpected-event")
    assert written(orch) == before  # a second delivery is refused and records nothing
    drain(orch, saga_id)
    assert client.get(f"/sagas/{saga_id}").json()["state"] == "completed"
    received = [e for e in orch.history(saga_id) if e.type == "EventReceived"]
    assert len(received) == 1


def test_cancel_of_a_waiting_saga(client: TestClient, orch: Orchestrator) -> None:
    """POST /cancel of a waiting saga answers 202 and the saga ends cancelled, its reason recorded."""
    saga_id = client.post("/sagas/Approve", json=order()).json()["saga_id"]
    orch.run_worker(wait=False, poll_interval=0.01)
    cancelled = client.post(f"/sagas/{saga_id}/cancel", json={"reason": "customer changed their mind"})
    assert cancelled.status_code == 202, cancelled.text
    (final,) = drain(orch, saga_id)
    assert final.state == "cancelled"
    assert any("customer changed their mind" in str(e.data) for e in orch.history(saga_id))


# 2. Idempotency


def test_repeat_start_is_idempotent_and_other_input_conflicts(client: TestClient, orch: Orchestrator) -> None:
    """The same Idempotency-Key and input gives the same answer and one saga; other input gives 409, writing nothing."""
    headers = {"Idempotency-Key": "order-1"}
    first = client.post("/sagas/Ship", json=order(), headers=headers)
    again = client.post("/sagas/Ship", json=order(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert first.headers["location"] == again.headers["location"] == "/sagas/order-1"
    before = written(orch)
    assert before == [("order-1", 1, 1)]

    other = client.post("/sagas/Ship", json=order(quantity=2), headers=headers)
    assert "order-1" in assert_problem(other, 409, "saga-already-started")["detail"]
    other_saga = client.post("/sagas/Approve", json=order(), headers=headers)
    assert_problem(other_saga, 409, "saga-already-started")
    assert written(orch) == before


# 3. Not found


def test_unknown_saga_id_is_404(client: TestClient, orch: Orchestrator, subtests: pytest.Subtests) -> None:
    """Every route of a saga id that was never started answers 404 saga-not-found and writes nothing."""
    client.post("/sagas/Ship", json=order(), headers={"Idempotency-Key": "exists"})
    before = written(orch)
    for method, path in [
        ("GET", "/sagas/nope"),
        ("GET", "/sagas/nope/history"),
        ("GET", "/sagas/nope/timeline"),
        ("POST", "/sagas/nope/events/approved"),
        ("POST", "/sagas/nope/cancel"),
        ("POST", "/sagas/nope/retry"),
    ]:
        with subtests.test(msg=f"{method} {path}"):
            body = assert_problem(client.request(method, path), 404, "saga-not-found")
            assert body["instance"] == path
            assert written(orch) == before


def test_unknown_saga_name_is_404(client: TestClient, orch: Orchestrator) -> None:
    """Starting, listing or counting a saga name nobody registered is 404 unknown-saga, naming the registered ones."""
    body = assert_problem(client.post("/sagas/Teleport", json=order()), 404, "unknown-saga")
    assert "Approve, Ship" in body["detail"]
    assert_problem(client.get("/sagas", params={"saga": "Teleport"}), 404, "unknown-saga")
    assert_problem(client.get("/sagas/counts", params={"saga": "Teleport"}), 404, "unknown-saga")
    assert orch.list() == []


# 4. Bad input: a problem each, and nothing written

KEYED = {**JSON, "Idempotency-Key": "x"}
OK = b'{"customer": "ada", "quantity": 1}'
BAD_STARTS: list[tuple[str, bytes, dict[str, str], int, str, str]] = [
    # (case, body, headers, status, problem type, in the detail)
    ("invalid JSON", b'{"customer": "ada", "quantity": ', JSON, 400, "invalid-json", "not valid JSON"),
    ("truncated JSON", b"[1, 2", JSON, 400, "invalid-json", "not valid JSON"),
    ("wrong types", b'{"customer": 7, "quantity": "many"}', JSON, 422, "invalid-input", "customer"),
    ("missing field", b'{"customer": "ada"}', JSON, 422, "invalid-input", "quantity: Field required"),
    ("not an object", b'["ada", 1]', JSON, 422, "invalid-input", ""),
    ("no body", b"", JSON, 422, "invalid-input", "Field required"),
    ("NUL", b'{"customer": "a\\u0000b", "quantity": 1}', JSON, 422, "invalid-input", "customer: contains a NUL"),
    ("NaN", b'{"customer": "a", "quantity": 1, "weight": NaN}', JSON, 422, "invalid-input", "weight: nan is not"),
    ("-Infinity", b'{"customer": "a", "quantity": 1, "weight": -Infinity}', JSON, 422, "invalid-input", "weight: -inf"),
    ("NaN for an int", b'{"customer": "ada", "quantity": NaN}', JSON, 422, "invalid-input", "finite"),
    ("int over 64 bits", b'{"customer": "a", "quantity": 1' + b"0" * 30 + b"}", JSON, 422, "invalid-input", "64-bit"),
    ("blank key", OK, {**JSON, "Idempotency-Key": "   "}, 422, "invalid-input", "empty"),
    ("long key", OK, {**JSON, "Idempotency-Key": "k" * 201}, 422, "invalid-input", "at most 200"),
    ("bad callback", OK, {**KEYED, "Callback-URL": "ftp://x"}, 422, "invalid-input", "http"),
]


def test_bad_start_is_a_problem_and_writes_nothing(
    client: TestClient, orch: Orchestrator, subtests: pytest.Subtests
) -> None:
    """Each malformed start gets its problem (400 invalid-json, 422 invalid-input saying why) and stores nothing."""
    client.post("/sagas/Ship", json=order(), headers={"Idempotency-Key": "before"})
    before = written(orch)
    for case, body, headers, status, slug, says in BAD_STARTS:
        with subtests.test(msg=case):
            problem = assert_problem(client.post("/sagas/Ship", content=body, headers=headers), status, slug)
            assert says in problem["detail"]
            assert written(orch) == before


def test_wrong_types_list_every_field(client: TestClient, orch: Orchestrator) -> None:
    """A body failing the saga's input model lists each bad field in ``errors``, with its location and type."""
    response = client.post("/sagas/Ship", json={"customer": 7, "quantity": "many"})
    problem = assert_problem(response, 422, "invalid-input")
    errors = {tuple(e["loc"]): e["type"] for e in problem["errors"]}
    assert errors == {("body", "customer"): "string_type", ("body", "quantity"): "int_parsing"}
    assert problem["detail"].startswith("customer:")
    assert orch.list() == []


@pytest.fixture
def waiting(client: TestClient, orch: Orchestrator) -> str:
    """The id of an Approve saga waiting for ``approved``."""
    saga_id: str = client.post("/sagas/Approve", json=order(), headers={"Idempotency-Key": "w"}).json()["saga_id"]
    orch.run_worker(wait=False, poll_interval=0.01)
    assert orch.status(saga_id).waiting_for == "approved"
    return saga_id


BAD_COMMANDS: list[tuple[str, str, bytes, int, str, str]] = [
    # (case, route, body, status, problem type, in the detail)
    ("unknown event", "events/shipped", b"{}", 409, "unexpected-event", "does not wait for 'shipped'"),
    ("NaN in an event", "events/approved", b'{"by": NaN}', 422, "invalid-input", "by: nan is not a finite number"),
    ("NUL in an event", "events/approved", b'{"by": "a\\u0000"}', 422, "invalid-input", "by: contains a NUL"),
    ("invalid JSON event", "events/approved", b'{"by": ', 400, "invalid-json", "not valid JSON"),
    ("event not an object", "events/approved", b"[1]", 422, "invalid-input", "dictionary"),
    ("NUL in a reason", "cancel", b'{"reason": "a\\u0000"}', 422, "invalid-input", "NUL"),
    ("unknown cancel field", "cancel", b'{"reason": "x", "force": true}', 422, "invalid-input", "force"),
    ("wrong cancel type", "cancel", b'{"compensate": "maybe"}', 422, "invalid-input", "compensate"),
    ("retry of a waiting saga", "retry", b"", 409, "invalid-transition", "only a failed saga"),
]


def test_bad_command_is_a_problem_and_writes_nothing(
    client: TestClient, orch: Orchestrator, waiting: str, subtests: pytest.Subtests
) -> None:
    """Each bad event, cancel or retry of a waiting saga gets its problem and leaves its history as it was."""
    before = written(orch)
    for case, route, body, status, slug, says in BAD_COMMANDS:
        with subtests.test(msg=case):
            response = client.post(f"/sagas/{waiting}/{route}", content=body, headers=JSON)
            problem = assert_problem(response, status, slug)
            assert says in problem["detail"]
            assert written(orch) == before
    assert orch.status(waiting).waiting_for == "approved"


def test_commands_on_a_finished_saga_are_409(client: TestClient, orch: Orchestrator) -> None:
    """Cancel, events and retry of a completed saga answer 409 and write nothing."""
    saga_id = client.post("/sagas/Ship", json=order()).json()["saga_id"]
    drain(orch, saga_id)
    before = written(orch)
    assert (
        "nothing to cancel"
        in assert_problem(client.post(f"/sagas/{saga_id}/cancel", json={"reason": "late"}), 409, "invalid-transition")[
            "detail"
        ]
    )
    assert_problem(client.post(f"/sagas/{saga_id}/cancel", json={"compensate": False}), 409, "invalid-transition")
    assert_problem(client.post(f"/sagas/{saga_id}/events/approved", json={}), 409, "unexpected-event")
    assert_problem(client.post(f"/sagas/{saga_id}/retry"), 409, "invalid-transition")
    assert written(orch) == before


def test_bad_query_parameters_are_422(client: TestClient) -> None:
    """Naive times, bad cursors, search without ':' and limits out of range are 422 invalid-input."""
    client.post("/sagas/Ship", json=order(), headers={"Idempotency-Key": "q"})
    for path, params in [
        ("/sagas/q", {"at": "2030-01-01T00:00:00"}),
        ("/sagas", {"created_after": "2030-01-01T00:00:00"}),
        ("/sagas", {"cursor": "not-a-cursor"}),
        ("/sagas", {"search": "customer"}),
        ("/sagas", {"limit": "0"}),
        ("/sagas", {"limit": "1001"}),
        ("/sagas", {"state": "sleeping"}),
    ]:
        assert_problem(client.get(path, params=params), 422, "invalid-input")


# 5. Body limit


def chunks(size: int, piece: int = 256) -> Iterator[bytes]:
    """A JSON body of about ``size`` bytes, sent in pieces (chunked: no Content-Length)."""
    yield b'{"customer": "'
    for _ in range(size // piece):
        yield b"x" * piece
    yield b'", "quantity": 1}'


def test_body_limit(client: TestClient, orch: Orchestrator, waiting: str, subtests: pytest.Subtests) -> None:
    """A body over max_body_bytes gets 413 with or without Content-Length, writing nothing; one under it is read."""
    before = written(orch)
    with subtests.test(msg="content-length"):
        body = b"".join(chunks(LIMIT + 100))
        response = client.post("/sagas/Ship", content=body, headers={**JSON, "Idempotency-Key": "big"})
        assert response.request.headers["content-length"] == str(len(body))
        assert "2,048 bytes" in assert_problem(response, 413, "body-too-large")["detail"]
        assert written(orch) == before
    for path in ["/sagas/Ship", "/sagas/w/events/approved", "/sagas/w/cancel"]:
        with subtests.test(msg=f"chunked {path}"):
            response = client.post(path, content=chunks(LIMIT * 2), headers=JSON)
            assert "content-length" not in response.request.headers
            assert_problem(response, 413, "body-too-large")
            assert written(orch) == before
    with subtests.test(msg="chunked under the limit"):
        response = client.post("/sagas/Ship", content=chunks(LIMIT // 2), headers={**JSON, "Idempotency-Key": "fits"})
        assert response.status_code == 202, response.text
        assert len(orch.history("fits")) == 1


# 6. The bearer token


@pytest.fixture
def guarded(database_url: str) -> Iterator[tuple[TestClient, Orchestrator]]:
    """A client of an app whose settings require the bearer token for changes."""
    token = SecretStr(TOKEN)
    with (
        Orchestrator(sagas=[Ship, Approve], database=database_url, settings=settings(api_token=token)) as orch,
        TestClient(create_app(orch)) as client,
    ):
        yield client, orch


def test_token_rules(guarded: tuple[TestClient, Orchestrator]) -> None:
    """Changes need ``Authorization: Bearer <token>`` (else 401 + WWW-Authenticate, nothing written); reads do not."""
    client, orch = guarded
    right = {"Authorization": f"Bearer {TOKEN}"}
    started = client.post("/sagas/Approve", json=order(), headers={**right, "Idempotency-Key": "g"})
    assert started.status_code == 202
    orch.run_worker(wait=False, poll_interval=0.01)
    before = written(orch)

    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}]
    for headers in wrong:
        for path, body in [
            ("/sagas/Ship", b'{"customer": "ada", "quantity": 1}'),
            ("/sagas/Ship", b'{"customer": 7}'),  # the token is checked before the body is judged
            ("/sagas/Ship", b'{"customer": '),
            ("/sagas/Teleport", b"{}"),
            ("/sagas/g/events/approved", b"{}"),
            ("/sagas/g/cancel", b"{}"),
            ("/sagas/g/retry", b""),
        ]:
            response = client.post(path, content=body, headers={**JSON, **headers})
            problem = assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text
            assert problem["instance"] == path
    assert written(orch) == before

    assert client.get("/sagas/g").status_code == 202  # waiting: not finished, but readable
    for path in ["/sagas", "/sagas/counts", "/sagas/g/history", "/sagas/g/timeline", "/healthz"]:
        assert client.get(path).status_code == 200, path
    sent = client.post("/sagas/g/events/approved", json={}, headers={"Authorization": f"bearer  {TOKEN} "})
    assert sent.status_code == 202


# 7. Long polls


def test_long_poll_returns_when_the_saga_ends(client: TestClient, orch: Orchestrator) -> None:
    """``Prefer: wait=10`` on a saga a worker thread finishes after 0.5 s answers 200 soon after, long before 10 s."""
    saga_id = client.post("/sagas/Ship", json=order()).json()["saga_id"]

    def work() -> None:
        time.sleep(0.5)
        drain(orch, saga_id)

    worker = threading.Thread(target=work)
    began = time.monotonic()
    worker.start()
    try:
        response = client.get(f"/sagas/{saga_id}", headers={"Prefer": "respond-async, wait=10"})
    finally:
        worker.join()
    took = time.monotonic() - began
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "completed"
    assert response.headers["preference-applied"] == "wait=10"
    assert 0.4 <= took < 3, took

    began = time.monotonic()  # now that it has ended, a long poll answers at once; waits over 60 s are capped
    again = client.get(f"/sagas/{saga_id}", headers={"Prefer": "wait=3600"})
    assert again.status_code == 200
    assert again.headers["preference-applied"] == "wait=60"
    assert time.monotonic() - began < 1


def test_long_poll_times_out_with_202(client: TestClient) -> None:
    """With no worker running, ``Prefer: wait=1`` holds the request about 1 s and then answers 202 + Retry-After."""
    saga_id = client.post("/sagas/Ship", json=order()).json()["saga_id"]
    began = time.monotonic()
    response = client.get(f"/sagas/{saga_id}", headers={"Prefer": "wait=1"})
    took = time.monotonic() - began
    assert response.status_code == 202
    assert response.json()["state"] == "pending"
    assert response.headers["retry-after"] == "1"
    assert response.headers["preference-applied"] == "wait=1"
    assert 0.9 <= took < 2.5, took


# 8. Time travel


def test_at_returns_the_earlier_state(client: TestClient, orch: Orchestrator) -> None:
    """?at=TIME between start and end gives the pending status of then (without it: completed; before it: 404)."""
    saga_id = client.post("/sagas/Ship", json=order()).json()["saga_id"]
    time.sleep(0.02)
    between = datetime.now(UTC)
    time.sleep(0.02)
    drain(orch, saga_id)

    then = client.get(f"/sagas/{saga_id}", params={"at": between.isoformat()})
    assert then.status_code == 200
    assert then.json()["state"] == "pending"
    assert then.json()["version"] == 1
    assert then.json()["result"] == {}
    now = client.get(f"/sagas/{saga_id}")
    assert now.json()["state"] == "completed"
    assert now.json()["version"] > 1
    before = client.get(f"/sagas/{saga_id}", params={"at": "2000-01-01T00:00:00Z"})
    assert "started after" in assert_problem(before, 404, "saga-not-found")["detail"]


# 9. Pages and filters


def test_pages_follow_next_links_to_the_end(client: TestClient) -> None:
    """Seven sagas in pages of 3, following ``next`` (and the same Link rel=next), are each seen exactly once."""
    ids = {client.post("/sagas/Ship", json=order(f"c{i}", i)).json()["saga_id"] for i in range(7)}
    seen: list[str] = []
    url: str | None = "/sagas?limit=3"
    pages = 0
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200
        page = response.json()
        seen += [s["saga_id"] for s in page["items"]]
        pages += 1
        url = page["next"]
        if url is None:
            assert page["next_cursor"] is None
            assert "link" not in response.headers
        else:
            assert response.headers["link"] == f'<{url}>; rel="next"'
            assert url.startswith("/sagas?limit=3&cursor=")
        assert pages <= 3
    assert pages == 3
    assert len(seen) == 7
    assert set(seen) == ids


def test_filters_by_state_saga_and_search(client: TestClient, orch: Orchestrator) -> None:
    """state=, saga= and search=customer:value select exactly the matching sagas; counts agree."""
    ada = [client.post("/sagas/Ship", json=order("ada", i)).json()["saga_id"] for i in range(2)]
    bob = client.post("/sagas/Ship", json=order("bob")).json()["saga_id"]
    approve = client.post("/sagas/Approve", json=order("ada")).json()["saga_id"]
    orch.run_worker(wait=False, poll_interval=0.01)  # the Ships complete, Approve waits
    carol = client.post("/sagas/Ship", json=order("carol")).json()["saga_id"]  # pending

    def ids(**params: Any) -> set[str]:
        response = client.get("/sagas", params=params)
        assert response.status_code == 200, response.text
        return {s["saga_id"] for s in response.json()["items"]}

    assert ids() == {*ada, bob, approve, carol}
    assert ids(state="completed") == {*ada, bob}
    assert ids(state="waiting") == {approve}
    assert ids(state="pending") == {carol}
    assert ids(saga="Approve") == {approve}
    assert ids(saga="Ship", state="pending") == {carol}
    assert ids(search="customer:ada") == set(ada)  # Approve does not declare customer searchable
    assert ids(search="customer:bob", state="completed") == {bob}
    assert ids(search="customer:dave") == set()
    assert ids(created_after="2000-01-01T00:00:00Z", updated_before="2000-01-01T00:00:00Z") == set()

    counts = client.get("/sagas/counts").json()
    assert counts["total"] == 5
    assert counts["counts"] == {"Ship": {"completed": 3, "pending": 1}, "Approve": {"waiting": 1}}
    assert client.get("/sagas/counts", params={"saga": "Approve"}).json()["total"] == 1


# 10. Operations


def test_healthz_metrics_and_openapi(client: TestClient) -> None:
    """/healthz says the database is ok, /metrics is Prometheus text, /openapi.json documents problem+json."""
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["database"] == "ok"

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in metrics.text

    document = client.get("/openapi.json").json()
    start = document["paths"]["/sagas/Ship"]["post"]
    assert start["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Order")
    conflict = start["responses"]["409"]["content"]
    assert list(conflict) == ["application/problem+json"]
    assert conflict["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    assert "404" in document["paths"]["/sagas"]["get"]["responses"]


def test_access_log_has_no_body_query_or_token(guarded: tuple[TestClient, Orchestrator]) -> None:
    """The access log line gives method, path, status and time, never the body, the query string or the token."""
    client, _ = guarded
    with capture_logs() as logs:
        client.post(
            "/sagas/Ship",
            json=order("private-customer-name", 7),
            headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "logged"},
        )
        client.post("/sagas/Ship", content=b'{"customer": "private-broken', headers=JSON)
        client.get("/sagas", params={"search": "customer:private-query-value"})
    requests = [entry for entry in logs if entry.get("event") == "request"]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("POST", "/sagas/Ship", 202),
        ("POST", "/sagas/Ship", 401),
        ("GET", "/sagas", 200),
    ]
    assert all(isinstance(r["ms"], float) for r in requests)
    text = repr(logs)
    for secret in (TOKEN, "private-customer-name", "private-broken", "private-query-value"):
        assert secret not in text
