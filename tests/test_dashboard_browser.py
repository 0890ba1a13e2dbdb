"""The dashboard in a real browser: headless Debian Chromium driven by Playwright, against the app
served by uvicorn in this process and a worker thread, with the API token required."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from pydantic import BaseModel, SecretStr

from orchestrator import NonRetryable, Orchestrator, RetryPolicy, Saga, SagaState, Settings, step, wait_for
from orchestrator.http.app import create_app
from orchestrator.worker import Worker

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "t0ken"
DOCS_SHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"

pytestmark = pytest.mark.browser
CHARGES: dict[str, int] = {}
"""Attempts of charge_card per customer: the first one of each fails."""


class Order(BaseModel):
    customer: str
    items: int = 1


class PlaceOrder(Saga[Order]):
    """Reserve stock, charge the card (one transient fault first), wait for approval, ship."""

    search = ["customer"]

    @step
    def reserve_stock(self, order: Order) -> dict[str, int]:
        time.sleep(0.12)
        return {"reserved": order.items}

    @reserve_stock.compensate
    def release_stock(self, order: Order, reserved: dict[str, int]) -> None:
        time.sleep(0.05)

    @step(retry=RetryPolicy(max_attempts=3, initial_interval=0.1, max_interval=0.1))
    def charge_card(self, order: Order) -> str:
        time.sleep(0.08)
        if order.customer == "mallory":
            raise NonRetryable("card declined")
        tries = CHARGES[order.customer] = CHARGES.get(order.customer, 0) + 1
        if tries == 1:
            raise ConnectionError("payment gateway timed out")
        return f"charge-{order.customer}-{order.items}"

    @charge_card.compensate
    def refund(self, order: Order, charge: str) -> None:
        time.sleep(0.05)

    approval = wait_for("approved", timeout=3600)

    @step
    def ship(self, order: Order) -> str:
        return "shipped"


class Note(BaseModel):
    text: str


class SendReceipt(Saga[Note]):
    @step
    def send(self, note: Note) -> str:
        return f"sent: {note.text}"


@dataclass
class Served:
    url: str
    orch: Orchestrator


def browser_or_skip() -> None:
    """Skip when Chromium is missing, unless SAGA_REQUIRE_BROWSER=1 (then fail)."""
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("SAGA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SAGA_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install -y chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")


def settle(orch: Orchestrator, saga_ids: dict[str, SagaState], timeout: float = 10.0) -> None:
    """Wait until each saga is in the state given."""
    deadline = time.monotonic() + timeout
    while any(orch.status(i).state is not s for i, s in saga_ids.items()):
        assert time.monotonic() < deadline, {i: orch.status(i).state for i in saga_ids}
        time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The app on a free port (uvicorn in a thread), a worker thread, and a few sagas in known states."""
    browser_or_skip()
    settings = Settings.defaults().model_copy(update={"api_token": SecretStr(TOKEN)})
    orch = Orchestrator(
        sagas=[PlaceOrder, SendReceipt], database=f"sqlite:///{tmp_path / 'sagas.db'}", settings=settings
    ).open()
    worker = Worker(orch, poll_interval=0.05)
    working = threading.Thread(target=worker.run, kwargs={"drain": False}, name="worker", daemon=True)
    working.start()
    CHARGES.clear()
    orch.start(PlaceOrder, {"customer": "ada", "items": 3}, saga_id="order-1001")
    orch.start(PlaceOrder, {"customer": "bob"}, saga_id="order-1002")
    orch.start(PlaceOrder, {"customer": "mallory"}, saga_id="order-1003")
    orch.start(PlaceOrder, {"customer": "carol"}, saga_id="order-1004")
    orch.start(SendReceipt, {"text": "thanks"}, saga_id="receipt-77")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(orch), log_level="warning", access_log=False, lifespan="on"))
    serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    serving.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert serving.is_alive(), "uvicorn stopped"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        settle(
            orch,
            {
                "order-1001": SagaState.WAITING,
                "order-1002": SagaState.WAITING,
                "order-1003": SagaState.COMPENSATED,
                "order-1004": SagaState.WAITING,
                "receipt-77": SagaState.COMPLETED,
            },
        )
        yield Served(f"http://127.0.0.1:{port}", orch)
    finally:
        worker.stop()
        working.join(10)
        server.should_exit = True
        serving.join(10)
        sock.close()
        orch.close()


def test_operator_filters_opens_a_saga_and_cancels_it(served: Served, tmp_path: Path) -> None:
    """In Chromium: filter by state, open a waiting saga, be refused without the token, cancel with it
    (confirming the undo plan), and watch the page turn cancelled on its own; screenshot saved."""
    from playwright.sync_api import expect, sync_playwright

    dialogs: list[str] = []
    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("request", lambda r: None if r.url.startswith(served.url) else outside.append(r.url))
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
            page.set_default_timeout(8000)

            page.goto(served.url + "/")
            expect(page.locator("#overview .total.all .n")).to_have_text("5")
            expect(page.locator("table.sagas tbody tr")).to_have_count(5)
            page.screenshot(path=tmp_path / "index.png", full_page=True)

            page.select_option("select[name=state]", "waiting")
            page.click("form.filters button[type=submit]")
            page.wait_for_url(served.url + "/?state=waiting")  # the form's empty fields are dropped
            rows = page.locator("table.sagas tbody tr")
            expect(rows).to_have_count(3)
            assert sorted(rows.locator("td.id").all_inner_texts()) == ["order-1001", "order-1002", "order-1004"]

            page.click("text=order-1001")
            page.wait_for_url(served.url + "/ui/sagas/order-1001")
            expect(page.locator("#saga-state")).to_have_text("waiting")
            expect(page.locator(".tl .bar.retrying")).to_have_count(1)  # charge_card's transient fault

            page.click("#cancel-button")  # no token yet: the API refuses, the page says why
            expect(page.locator("#alert")).to_contain_text("401")
            expect(page.locator("#alert")).to_contain_text("bearer token")
            assert served.orch.status("order-1001").state is SagaState.WAITING

            page.click("table.history tr:first-child summary")  # opened by hand: stays open across refreshes
            page.fill("#token", TOKEN)
            page.fill("#actions input[name=reason]", "customer called to cancel")
            page.click("#cancel-button")
            expect(page.locator("#alert")).to_contain_text("Cancel requested")
            expect(page.locator("#saga-state")).to_have_text("cancelled", timeout=10000)  # polled, no reload
            expect(page.locator("#actions")).not_to_contain_text("Cancel saga")
            expect(page.locator("table.history")).to_contain_text("SagaCancelled")
            expect(page.locator("table.history")).to_contain_text("customer called to cancel")  # the JSON body
            expect(page.locator(".tl .bar.abandoned")).to_have_count(1)
            expect(page.locator("table.history tr:first-child details")).to_have_attribute("open", "")
            expect(page.locator(".tl-label.kind-compensation")).to_have_count(2)
            assert page.evaluate("sessionStorage.getItem('sagaworks.token')") == TOKEN
            assert TOKEN not in page.url

            page.click("table.history tr:first-child summary")
            page.evaluate("window.scrollTo(0, 0)")  # the sticky actions panel sits at the top
            page.mouse.move(0, 0)
            shot = page.screenshot(full_page=True)

            page.go_back()  # the back button keeps the filters
            page.wait_for_url(served.url + "/?state=waiting")
            expect(rows).to_have_count(2)
            served.orch.cancel("order-1004")  # elsewhere: the list and the counts follow without a reload
            expect(page.locator("#overview .total.state-cancelled .n")).to_have_text("2", timeout=6000)
            expect(rows).to_have_count(1, timeout=6000)
            expect(rows.locator("td.id")).to_have_text(["order-1002"])
            assert page.url == served.url + "/?state=waiting"

            # The other waiting order gets its approval, with a payload, from the same tab's token.
            page.click("text=order-1002")
            expect(page.locator("#actions input[name=event]")).to_have_value("approved")  # its waiting_for
            page.fill("#actions textarea[name=payload]", '{"by": "ops", "note": "<b>ok</b>"}')
            page.screenshot(path=tmp_path / "waiting.png")
            page.click("#send-button")
            expect(page.locator("#alert")).to_contain_text("Event delivered")
            expect(page.locator("#saga-state")).to_have_text("completed", timeout=10000)
            expect(page.locator("table.history")).to_contain_text("EventReceived")
        finally:
            browser.close()

    assert len(dialogs) == 3
    assert dialogs[1].index("1. charge_card") < dialogs[1].index("2. reserve_stock"), dialogs[1]
    assert "order-1002" in dialogs[2]
    assert outside == []
    assert served.orch.status("order-1001").state is SagaState.CANCELLED
    received = [e for e in served.orch.history("order-1002") if e.type == "EventReceived"]
    assert [e.data["data"] for e in received] == [{"by": "ops", "note": "<b>ok</b>"}]
    (tmp_path / "dashboard.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG")
    # The artefact: kept where SAGA_ARTEFACTS points (CI sets it); SAGA_UPDATE_DOCS=1 refreshes the
    # README's picture (docs/dashboard.png) instead of leaving the work tree changed on every run.
    artefacts = os.environ.get("SAGA_ARTEFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", Path(artefacts) / "dashboard.png")
    if os.environ.get("SAGA_UPDATE_DOCS") == "1":
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", DOCS_SHOT)


def test_operator_finds_a_schedule_and_the_saga_its_last_tick_started(served: Served, tmp_path: Path) -> None:
    """In Chromium: the top bar's Schedules link shows each schedule with when it fires, its next tick
    and its last run; the last saga's link opens that saga's page; screenshot kept as an artefact."""
    from playwright.sync_api import expect, sync_playwright

    orch = served.orch
    orch.schedule(SendReceipt, schedule_id="daily-receipt", cron="0 9 * * *", tz="Europe/Paris", input={"text": "hi"})
    orch.schedule(SendReceipt, schedule_id="paused-one", every=3600, input={"text": "later"})
    orch.scheduler.pause("paused-one", "holiday")
    fired = orch.scheduler.trigger("daily-receipt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 700})
            page.set_default_timeout(8000)
            page.goto(served.url + "/")
            page.click("text=Schedules")
            daily = page.locator('tr[data-schedule-id="daily-receipt"]')
            expect(daily).to_contain_text("0 9 * * * (Europe/Paris)")
            expect(daily).to_contain_text("started")
            expect(page.locator('tr[data-schedule-id="paused-one"]')).to_contain_text("holiday")
            page.screenshot(path=tmp_path / "schedules.png", full_page=True)
            daily.locator("td.id a").click()
            expect(page.locator(".saga-id")).to_have_text(fired)
        finally:
            browser.close()
    assert (tmp_path / "schedules.png").read_bytes().startswith(b"\x89PNG")
    artefacts = os.environ.get("SAGA_ARTEFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "schedules.png", Path(artefacts) / "schedules.png")
