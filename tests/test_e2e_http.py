"""End to end with processes, as the README runs them: ``saga serve`` and ``saga worker``; a saga started
over HTTP, its Location polled to the end, its signed notification received even though the worker
delivering it was killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator import SagaStatus
from orchestrator.notify import verify

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SECRET = "e2e-secret"
TOKEN = "e2e-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlowFirstReceiver:
    """Receives notifications; the first POST hangs (so its worker can be killed mid-delivery)."""

    def __init__(self) -> None:
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        self.delivered: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not receiver.first_arrived.is_set():
                    receiver.first_arrived.set()
                    receiver.release.wait(30)  # hangs until the test is over
                    return
                receiver.delivered.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[SlowFirstReceiver]:
    """A receiver whose first notification hangs."""
    found = SlowFirstReceiver()
    yield found
    found.close()


def spawn(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--json-logs", *args, "--app", "tests.e2e_app:app"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_start_over_http_poll_to_the_end_and_get_the_notification_despite_a_killed_worker(
    durable_url: str, receiver: SlowFirstReceiver
) -> None:
    """202 + Location, polled with Prefer: wait to 200; the notification arrives signed after the worker
    that was sending it is killed (another worker takes the delivery over after its lease)."""
    port = free_port()
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": durable_url,
        "SAGA_API_TOKEN": TOKEN,
        "SAGA_NOTIFY_SECRET": SECRET,
        "SAGA_LEASE_SECONDS": "2",
        "SAGA_POLL_INTERVAL": "0.1",
        "PYTHONPATH": str(ROOT),
    }
    processes = [spawn(env, "serve", "--port", str(port))]
    first_worker = spawn(env, "worker")
    processes.append(first_worker)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "saga serve did not come up"
                time.sleep(0.1)
        started = httpx.post(
            f"{base}/sagas/Deliver",
            json={"item": "lamp", "weight": 3},
            headers={"Authorization": f"Bearer {TOKEN}", "Callback-URL": receiver.url, "Idempotency-Key": "e2e-1"},
        )
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        assert location == "/sagas/e2e-1"
        final = httpx.get(f"{base}{location}", headers={"Prefer": "wait=20"}, timeout=30)
        assert final.status_code == 200, final.text
        assert final.json()["state"] == "completed"
        assert final.json()["result"] == {"pick": "picked lamp", "post": 6}

        assert receiver.first_arrived.wait(20), "the worker never sent the notification"
        first_worker.send_signal(signal.SIGKILL)  # mid-delivery: the receiver has not answered
        first_worker.wait(10)
        processes.append(spawn(env, "worker"))
        deadline = time.monotonic() + 30
        while not receiver.delivered:
            assert time.monotonic() < deadline, "the notification never arrived after the worker was killed"
            time.sleep(0.1)
        headers, body = receiver.delivered[0]
        assert verify(SECRET, body, headers)
        assert int(headers["sagaworks-attempt"]) >= 2  # the killed worker's attempt counted as one
        status = SagaStatus.model_validate_json(body)
        assert (status.saga_id, status.state.value) == ("e2e-1", "completed")
        timeline = httpx.get(f"{base}/sagas/e2e-1/timeline").json()
        assert any(e["kind"] == "notification" and e["outcome"] == "succeeded" for e in timeline)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()
