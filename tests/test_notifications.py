"""Completion notifications: a signed POST to the saga's callback URL and a call of its class's hook,
queued once from the histories, delivered at least once with retries, visible in the timeline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, SecretStr

from orchestrator import Orchestrator, Saga, SagaState, SagaStatus, Settings, step, wait_for
from orchestrator import notify as notify_module
from orchestrator.notify import signature, verify
from orchestrator.worker import Worker
from tests.conftest import drain

SECRET = "s3cr3t-key"


class Order(BaseModel):
    item: str


class Ship(Saga[Order]):
    finished: ClassVar[list[tuple[str, str]]] = []

    @step
    def pack(self, order: Order) -> str:
        return f"packed {order.item}"

    def on_finished(self, status: SagaStatus) -> None:
        Ship.finished.append((status.saga_id, status.state.value))


class Park(Saga[Order]):
    @step
    def first(self, order: Order) -> None: ...

    approval = wait_for("approved")


class Receiver:
    """A local HTTP server that records the notifications it gets; it can answer 500 a few times first."""

    def __init__(self, fail: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.fail > 0:
                    receiver.fail -= 1
                    self.send_response(500)
                else:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/saga?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A notification receiver on a free local port."""
    found = Receiver()
    yield found
    found.close()


def settings() -> Settings:
    return Settings.defaults().model_copy(update={"notify_secret": SecretStr(SECRET)})


def deliver(orch: Orchestrator, rounds: int = 20) -> None:
    """Queue and deliver notifications until nothing is left to do now."""
    for _ in range(rounds):
        queued = orch.notifications.queue()
        if not orch.notifications.deliver(20) and not queued:
            return


def test_signature_verifies_and_rejects_tampering() -> None:
    """verify() accepts a genuine notification and refuses another body, another key or an old one."""
    body, stamp = b'{"a": 1}', "1700000000"
    headers = {"Sagaworks-Timestamp": stamp, "Sagaworks-Signature": signature(SECRET, stamp, body)}
    assert verify(SECRET, body, headers, tolerance=1e12)
    assert not verify(SECRET, b'{"a": 2}', headers, tolerance=1e12)
    assert not verify("other", body, headers, tolerance=1e12)
    assert not verify(SECRET, body, headers)  # too old


def test_an_ended_saga_notifies_its_url_and_its_hook_once(database_url: str, receiver: Receiver) -> None:
    """A saga started with notify=URL POSTs its final status there, signed; the class hook runs once."""
    Ship.finished = []
    with Orchestrator(sagas=[Ship, Park], database=database_url, settings=settings()) as orch:
        saga_id = orch.start(Ship, {"item": "lamp"}, notify=receiver.url)
        waiting = orch.start(Park, {"item": "x"}, notify=receiver.url)
        drain(orch, saga_id)
        deliver(orch)
        deliver(orch)  # again: nothing new is queued or sent
        timeline = orch.timeline(saga_id)
        assert orch.status(waiting).state is not SagaState.COMPLETED
    (headers, body) = receiver.received[0]
    assert len(receiver.received) == 1  # the waiting saga has not ended: nothing for it
    status = SagaStatus.model_validate_json(body)
    assert (status.saga_id, status.state) == (saga_id, SagaState.COMPLETED)
    assert status.result == {"pack": "packed lamp"}
    assert verify(SECRET, body, headers)
    assert headers["sagaworks-attempt"] == "1"
    assert Ship.finished == [(saga_id, "completed")]
    sent = [e for e in timeline if e.kind == "notification"]
    assert sorted(e.name for e in sent) == [
        "Ship.on_finished",
        f"http://127.0.0.1:{receiver.server.server_port}/hooks/saga",
    ]
    assert all(e.outcome == "succeeded" for e in sent)


def test_a_failing_receiver_gets_the_notification_again_later(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that answers 500 twice gets the notification on the third attempt; each try is in the timeline."""
    monkeypatch.setattr(notify_module, "retry_delay", lambda attempts: timedelta(0))
    flaky = Receiver(fail=2)
    try:
        with Orchestrator(sagas=[Ship], database=database_url, settings=settings()) as orch:
            saga_id = orch.start(Ship, {"item": "book"}, notify=flaky.url)
            drain(orch, saga_id)
            deliver(orch)
            tries = [e for e in orch.timeline(saga_id) if e.kind == "notification" and e.name.startswith("http")]
    finally:
        flaky.close()
    assert len(flaky.received) == 1
    assert [e.outcome for e in tries] == ["retrying", "retrying", "succeeded"]
    assert "500" in (tries[0].error or "")
    assert [e.attempt for e in tries] == [1, 2, 3]


def test_notifications_are_queued_from_the_histories_exactly_once(database_url: str, receiver: Receiver) -> None:
    """Two notifiers following the same log queue one delivery per saga and target, not two."""
    with Orchestrator(sagas=[Ship], database=database_url, settings=settings()) as orch:
        ids = [orch.start(Ship, {"item": f"i{i}"}, notify=receiver.url) for i in range(3)]
        drain(orch, *ids)
        orch.notifications.notifier.reset(orch.repository.index)  # a second follower, from the start
        orch.log.drain(orch.notifications.notifier)
        deliver(orch)
    assert sorted(json.loads(body)["saga_id"] for _, body in receiver.received) == sorted(ids)


class Hang(Saga[Order]):
    """A saga whose on_finished hook hangs until released (a hook that calls a dead service)."""

    entered: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    @step
    def pack(self, order: Order) -> None: ...

    def on_finished(self, status: SagaStatus) -> None:
        Hang.entered.set()
        Hang.release.wait(30)


def test_a_hanging_hook_holds_up_no_saga_and_urls_are_sent_at_once(database_url: str, receiver: Receiver) -> None:
    """In a running worker a hook that hangs delays no saga's steps, and deliveries go out as soon as queued."""
    Hang.entered.clear()
    Hang.release.clear()
    with Orchestrator(sagas=[Ship, Hang], database=database_url, settings=settings()) as orch:
        worker = Worker(orch, poll_interval=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            orch.start(Hang, {"item": "x"})
            assert Hang.entered.wait(10)
            started = time.monotonic()
            saga_id = orch.start(Ship, {"item": "lamp"})
            status = orch.wait(saga_id, timeout=5)
            took = time.monotonic() - started
            Hang.release.set()
            sent = orch.start(Ship, {"item": "mug"}, notify=receiver.url)
            orch.wait(sent, timeout=5)
            deadline = time.monotonic() + 5
            while not receiver.received and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            Hang.release.set()
            worker.stop()
            thread.join(10)
    assert status.state is SagaState.COMPLETED
    assert took < 2  # not behind the hung hook (it waits up to 30 s)
    assert [json.loads(body)["saga_id"] for _, body in receiver.received] == [sent]
