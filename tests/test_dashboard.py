"""The dashboard's pages through starlette's TestClient: counts, the filtered and paged list, a saga's
timeline, history and actions, escaping, the vendored assets, and nothing fetched from elsewhere."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from pydantic import BaseModel, SecretStr

from orchestrator import NonRetryable, Orchestrator, RetryPolicy, Saga, SagaState, Settings, step, wait_for
from orchestrator.http.app import create_app

with warnings.catch_warnings():  # starlette asks for httpx2, which the dev extra does not install
    warnings.simplefilter("ignore", UserWarning)  # StarletteDeprecationWarning
    from starlette.testclient import TestClient

STATIC = Path(__file__).resolve().parent.parent / "orchestrator" / "http" / "static"
SCRIPT_ID = "<script>alert(1)</script>"
FLAKY: dict[str, int] = {}


class Claim(BaseModel):
    employee: str
    amount: float = 10.0


class Expense(Saga[Claim]):
    search = ["employee"]

    @step(retry=RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.01))
    def file(self, claim: Claim) -> dict[str, str]:
        FLAKY[claim.employee] = FLAKY.get(claim.employee, 0) + 1
        if claim.employee == "flaky" and FLAKY[claim.employee] == 1:
            raise ConnectionError("ledger away")
        return {"filed_for": claim.employee}

    @file.compensate
    def unfile(self, claim: Claim, filed: dict[str, str]) -> None:
        pass

    @step
    def notify(self, claim: Claim) -> None:
        pass

    @step
    def book(self, claim: Claim) -> str:
        return "booked"

    @book.compensate
    def unbook(self, claim: Claim, booked: str) -> None:
        pass

    approval = wait_for("approved")

    @step
    def pay(self, claim: Claim) -> str:
        if claim.amount > 1000:
            raise NonRetryable("over budget")
        return "paid"


class Brittle(Saga[Claim]):
    """Fails for good, and so does the undo of its first step: it ends ``failed``."""

    @step
    def book(self, claim: Claim) -> str:
        return "booked"

    @book.compensate
    def unbook(self, claim: Claim, booked: str) -> None:
        raise NonRetryable("the booking system refuses")

    @step
    def confirm(self, claim: Claim) -> None:
        raise NonRetryable("no confirmation")


def settle(orch: Orchestrator, states: dict[str, SagaState], timeout: float = 10.0) -> None:
    """Run the worker in this process until each saga is in the state given."""
    deadline = time.monotonic() + timeout
    while any(orch.status(i).state is not s for i, s in states.items()):
        assert time.monotonic() < deadline, {i: orch.status(i).state for i in states}
        orch.run_worker(wait=False, poll_interval=0.01)
        time.sleep(0.005)


class Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())]


def saga_ids(html: str) -> list[str]:
    """The saga ids the list shows, in order (unescaped by the parser)."""
    return [a["data-saga-id"] for a in Tags(html).find("tr") if "data-saga-id" in a]


@pytest.fixture(params=["sqlite", "memory"])
def orch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orchestrator]:
    """An orchestrator with sagas waiting, completed, compensated and failed (on a SQLite file, or in memory)."""
    url = f"sqlite:///{tmp_path / 'sagas.db'}" if request.param == "sqlite" else "memory://"
    FLAKY.clear()
    with Orchestrator(sagas=[Expense, Brittle], database=url, settings=Settings.defaults()) as orch:
        orch.start(Expense, {"employee": "ada"}, saga_id="ada-1")
        orch.start(Expense, {"employee": "bob"}, saga_id="bob-1")
        orch.start(Expense, {"employee": "flaky", "amount": 5000}, saga_id="flaky-1")
        orch.start(Brittle, {"employee": "eve"}, saga_id="brittle-1")
        settle(orch, {"ada-1": SagaState.WAITING, "bob-1": SagaState.WAITING, "flaky-1": SagaState.WAITING})
        settle(orch, {"brittle-1": SagaState.FAILED})
        orch.send("bob-1", "approved", {"by": "ops"})
        orch.send("flaky-1", "approved")
        settle(orch, {"bob-1": SagaState.COMPLETED, "flaky-1": SagaState.COMPENSATED})
        yield orch


@pytest.fixture
def client(orch: Orchestrator) -> Iterator[TestClient]:
    """The app of ``orch`` (API and dashboard), started and stopped around the test."""
    with TestClient(create_app(orch)) as client:
        yield client


def test_index_shows_counts_per_state_and_saga_and_lists_sagas(client: TestClient) -> None:
    """The overview counts sagas by state and by saga, and the list shows every saga with a link to its page."""
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    totals = {what: n for n, what in re.findall(r'class="n">(\d+)</span><span class="what">(\w+)<', html)}
    assert totals == {
        "sagas": "4",
        "pending": "0",
        "running": "0",
        "waiting": "1",
        "compensating": "0",
        "completed": "1",
        "compensated": "1",
        "cancelled": "0",
        "failed": "1",
    }
    counts_row = re.search(r'<th><a href="/\?saga=Expense">Expense</a></th>(.*?)</tr>', html, re.S)
    assert counts_row is not None
    assert re.findall(r">(\d+)<", counts_row.group(1)) == ["0", "0", "1", "0", "1", "1", "0", "0", "3"]
    assert sorted(saga_ids(html)) == ["ada-1", "bob-1", "brittle-1", "flaky-1"]
    assert Tags(html).find("a", href="/ui/sagas/ada-1")
    assert "over budget" in html  # the compensated saga's error, in its row


def test_filters_in_the_query_string_filter_the_list(client: TestClient, orch: Orchestrator) -> None:
    """state, saga, search and the time ranges in the query string filter the list, and the form keeps them."""
    assert saga_ids(client.get("/?state=waiting").text) == ["ada-1"]
    assert sorted(saga_ids(client.get("/?saga=Expense").text)) == ["ada-1", "bob-1", "flaky-1"]
    assert saga_ids(client.get("/?saga=Brittle").text) == ["brittle-1"]
    assert saga_ids(client.get("/?search=employee:bob").text) == ["bob-1"]
    assert saga_ids(client.get("/?saga=Expense&state=completed&search=employee:ada").text) == []
    created = orch.status("bob-1").created_at
    after = (created - timedelta(microseconds=1)).isoformat()
    assert sorted(saga_ids(client.get("/", params={"created_after": after}).text)) == ["bob-1", "brittle-1", "flaky-1"]
    before = orch.status("ada-1").updated_at + timedelta(microseconds=1)
    assert "ada-1" in saga_ids(client.get("/", params={"updated_before": before.isoformat()}).text)
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert saga_ids(client.get("/", params={"created_after": future}).text) == []

    page = Tags(client.get("/?state=waiting&saga=Expense&search=employee:ada").text)
    assert page.find("option", value="waiting", selected="")
    assert page.find("option", value="Expense", selected="")
    assert page.find("input", name="search", value="employee:ada")


def test_a_submitted_form_redirects_to_its_filters_without_empty_fields(client: TestClient) -> None:
    """The filter form's empty fields are dropped by a 303 to the clean query string (what links and back keep)."""
    form = "/?state=waiting&saga=&search=&created_after=&created_before=&updated_after=&updated_before=&limit="
    response = client.get(form, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/?state=waiting"
    assert client.get("/?state=&saga=", follow_redirects=False).headers["location"] == "/"


def test_bad_filters_are_reported_on_the_page(client: TestClient) -> None:
    """An unknown state, saga, bad time, search or page size gives a 400 page naming the problem, not a crash."""
    cases = {
        "/?state=sleeping": "unknown state",
        "/?saga=Nope": "unknown saga",
        "/?created_after=yesterday": "created_after: not an ISO date or time",
        "/?search=employee": "search takes field:value",
        "/?limit=5000": "limit: a page holds 1 to 200 sagas",
        "/?cursor=bogus": "not a cursor",
    }
    for url, message in cases.items():
        response = client.get(url)
        assert response.status_code == 400, url
        assert message in response.text, url
        assert saga_ids(response.text) == [], url


def test_paging_links_walk_every_saga_once_and_keep_the_filters(client: TestClient) -> None:
    """With limit=1, "next" links carry the cursor and the filters, visit each saga once, and "first page" goes back."""
    seen: list[str] = []
    url: str | None = "/?saga=Expense&limit=1"
    while url is not None:
        html = client.get(url).text
        seen += saga_ids(html)
        tags = Tags(html)
        firsts = tags.find("a", class_="button")
        if "cursor=" in url:
            assert {"href": "/?saga=Expense&limit=1", "class": "button"} in firsts  # the first-page link
        nexts = [a for t, a in tags.tags if t == "a" and a.get("rel") == "next"]
        url = nexts[0]["href"] if nexts else None
        if url is not None:
            query = parse_qs(urlsplit(url).query)
            assert query["saga"] == ["Expense"]
            assert query["limit"] == ["1"]
            assert query["cursor"]
    assert sorted(seen) == ["ada-1", "bob-1", "flaky-1"]
    assert len(seen) == 3


def test_the_list_refreshes_itself_with_the_same_filters(client: TestClient) -> None:
    """The list polls its partial every 2 s with the page's own filters and cursor; the partial filters alike
    and updates the counts out of band."""
    html = client.get("/?state=waiting&search=employee:ada").text
    (polled,) = Tags(html).find("div", id="list")
    assert polled["hx-trigger"] == "every 2s"  # ada-1 is still waiting
    assert polled["hx-get"] == "/ui/partials/sagas?state=waiting&search=employee%3Aada"
    partial = client.get(polled["hx-get"])
    assert partial.status_code == 200
    assert saga_ids(partial.text) == ["ada-1"]
    assert Tags(partial.text).find("section", id="overview", **{"hx-swap-oob": "true"})
    assert "<html" not in partial.text


def test_the_list_polls_slowly_once_nothing_runs(client: TestClient, orch: Orchestrator) -> None:
    """When every saga is finished the list refreshes every 10 s instead of every 2 s."""
    orch.cancel("ada-1")
    settle(orch, {"ada-1": SagaState.CANCELLED})
    (polled,) = Tags(client.get("/").text).find("div", id="list")
    assert polled["hx-trigger"] == "every 10s"


def test_saga_page_shows_status_timeline_bars_and_history(client: TestClient, orch: Orchestrator) -> None:
    """The saga page shows state, error and result, one bar per attempt placed by time and coloured by outcome,
    and every history event as a row."""
    response = client.get("/ui/sagas/flaky-1")
    assert response.status_code == 200
    html = response.text
    tags = Tags(html)
    assert 'id="saga-state">compensated<' in html
    assert "over budget" in html
    assert "&#34;filed_for&#34;: &#34;flaky&#34;" in html  # the result, pretty JSON
    bars = [a for t, a in tags.tags if t == "rect" and "bar" in a.get("class", "").split()]
    outcomes = [a["class"].split()[1] for a in bars]
    assert outcomes == [
        "retrying",
        "succeeded",
        "succeeded",
        "succeeded",
        "received",
        "failed",
        "succeeded",
        "succeeded",
    ]
    timeline = orch.timeline("flaky-1")
    assert len(bars) == len(timeline)
    lefts = [float(a["x"].rstrip("%")) for a in bars]
    widths = [float(a["width"].rstrip("%")) for a in bars]
    assert lefts == sorted(lefts)
    assert lefts[0] == 0.0
    assert min(lefts) >= 0
    assert min(widths) > 0
    assert max(x + w for x, w in zip(lefts, widths, strict=True)) <= 100.001
    assert max(x + w for x, w in zip(lefts, widths, strict=True)) == pytest.approx(100, abs=0.01)
    history = orch.history("flaky-1")
    rows = re.findall(r'<td class="evt">(\w+)</td>', html)
    assert rows == [event.type for event in history]
    assert "StepAttemptFailed" in rows
    assert "ledger away" in html
    (live,) = tags.find("div", id="live")
    assert "every 2s" not in live["hx-trigger"]  # finished: it no longer polls


def test_a_running_saga_page_refreshes_itself_and_offers_its_actions(client: TestClient) -> None:
    """A waiting saga's page polls its live partial every 2 s and offers Cancel and Send (defaulting to the
    event it waits for), both calling the JSON API, but not Retry."""
    tags = Tags(client.get("/ui/sagas/ada-1").text)
    (live,) = tags.find("div", id="live")
    assert live["hx-trigger"].startswith("every 2s")
    assert live["hx-get"] == "/ui/partials/saga/ada-1?actions_for=waiting"
    (cancel,) = tags.find("form", **{"data-action": "cancel"})
    assert cancel["hx-post"] == "/sagas/ada-1/cancel"
    assert cancel["hx-ext"] == "saga-api"
    assert cancel["hx-confirm"]
    (send,) = tags.find("form", **{"data-action": "send"})
    assert send["data-base"] == "/sagas/ada-1/events/"
    assert send["hx-confirm"]
    assert tags.find("input", name="event", value="approved")
    assert tags.find("textarea", name="payload")
    assert not tags.find("form", **{"data-action": "retry"})


def test_the_cancel_confirmation_lists_what_a_cancel_undoes_in_reverse(client: TestClient) -> None:
    """The cancel confirmation names the succeeded steps that have a compensation (from the plan), last first."""
    html = client.get("/ui/sagas/ada-1").text
    question = re.search(r'<pre id="cancel-question" hidden>(.*?)</pre>', html, re.S)
    assert question is not None
    text = question.group(1)
    assert "Cancel saga ada-1?" in text
    assert text.index("1. book") < text.index("2. file")  # the last done is undone first
    assert "notify" not in text  # succeeded, but it has no compensation
    assert "<dd>book → file</dd>" in html


def test_only_a_failed_saga_offers_retry(client: TestClient) -> None:
    """A failed saga offers Retry (to the retry endpoint) and neither Cancel nor Send; a completed one offers none."""
    failed = Tags(client.get("/ui/sagas/brittle-1").text)
    (retry,) = failed.find("form", **{"data-action": "retry"})
    assert retry["hx-post"] == "/sagas/brittle-1/retry"
    assert retry["hx-confirm"].startswith("Retry saga brittle-1?")
    assert not failed.find("form", **{"data-action": "cancel"})
    assert not failed.find("form", **{"data-action": "send"})
    done = client.get("/ui/sagas/bob-1").text
    assert "data-action=" not in done
    assert "nothing to do here" in done


def test_a_saga_id_with_a_slash_has_a_page_and_its_buttons(client: TestClient, orch: Orchestrator) -> None:
    """An id with "/" gets its page and its buttons (the API's routes take such ids, percent-encoded)."""
    orch.start(Expense, {"employee": "zoe"}, saga_id="team/zoe")
    html = client.get("/ui/sagas/team%2Fzoe").text
    assert '<span class="saga-id">team/zoe</span>' in html
    assert "data-action=" in html
    assert client.get("/ui/partials/saga/team%2Fzoe").status_code == 200


def test_the_live_partial_redraws_the_actions_only_when_the_state_changed(client: TestClient) -> None:
    """The polled partial carries the actions panel out of band only when the state differs from the one shown."""
    same = client.get("/ui/partials/saga/ada-1?actions_for=waiting").text
    assert "hx-swap-oob" not in same
    assert 'id="live"' in same
    changed = Tags(client.get("/ui/partials/saga/ada-1?actions_for=running").text)
    (panel,) = changed.find("aside", id="actions")
    assert panel["hx-swap-oob"] == "true"
    assert panel["data-state"] == "waiting"


def test_a_saga_id_with_markup_is_escaped_and_percent_encoded(client: TestClient, orch: Orchestrator) -> None:
    """A saga id holding <script> is shown as text on the list and its page, and percent-encoded in URLs."""
    orch.start(Expense, {"employee": "mallory"}, saga_id=SCRIPT_ID)
    for url in ["/", f"/ui/sagas/{quote(SCRIPT_ID, safe='')}", f"/ui/partials/saga/{quote(SCRIPT_ID, safe='')}"]:
        response = client.get(url)
        assert response.status_code == 200, url
        assert "<script>alert" not in response.text, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text, url
    index = Tags(client.get("/").text)
    assert index.find("a", href="/ui/sagas/%3Cscript%3Ealert%281%29%3C%2Fscript%3E")
    orch.start(Expense, {"employee": "mallory"}, saga_id='"><img src=x onerror=alert(1)>')
    settle(orch, {'"><img src=x onerror=alert(1)>': SagaState.WAITING})
    html = client.get("/ui/sagas/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E").text
    assert "<img src=x" not in html
    (cancel,) = Tags(html).find("form", **{"data-action": "cancel"})
    assert cancel["hx-post"] == "/sagas/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E/cancel"
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html  # in the confirmation, as text
    missing = client.get("/ui/sagas/%3Cb%3Enope")
    assert missing.status_code == 404
    assert "<b>nope" not in missing.text
    assert "&lt;b&gt;nope" in missing.text


def test_static_assets_are_served_from_the_package(client: TestClient) -> None:
    """htmx, its license, the CSS and the JS are served with their types; nothing else is reachable there."""
    htmx = client.get("/static/htmx.min.js")
    assert htmx.status_code == 200
    assert htmx.headers["content-type"] == "text/javascript; charset=utf-8"
    assert htmx.content == (STATIC / "htmx.min.js").read_bytes()
    assert b"htmx" in htmx.content[:200]
    assert client.get("/static/dashboard.css").headers["content-type"] == "text/css; charset=utf-8"
    assert client.get("/static/dashboard.js").headers["content-type"] == "text/javascript; charset=utf-8"
    assert "Zero-Clause BSD" in client.get("/static/htmx.LICENSE").text
    for name in ["missing.js", "..%2Fdashboard.py", "../dashboard.py", "%2e%2e/app.py"]:
        assert client.get(f"/static/{name}").status_code == 404, name
    html = client.get("/").text
    loaded = [a["src"] for a in Tags(html).find("script")] + [a["href"] for a in Tags(html).find("link")]
    for url in loaded:
        assert client.get(url).status_code == 200, url


def test_nothing_is_fetched_from_another_site(client: TestClient) -> None:
    """No page, partial or stylesheet names an absolute URL; every src and href is a path on this server."""
    pages = [
        "/",
        "/?state=waiting",
        "/ui/partials/sagas",
        "/ui/sagas/ada-1",
        "/ui/sagas/flaky-1",
        "/ui/sagas/brittle-1",
        "/ui/partials/saga/ada-1?actions_for=running",
        "/ui/sagas/nope",
        "/?state=sleeping",
    ]
    for url in pages:
        response = client.get(url)
        assert "http://" not in response.text, url
        assert "https://" not in response.text, url
        assert "default-src 'none'" in response.headers["content-security-policy"], url
        for tag, attrs in Tags(response.text).tags:
            for name in ("src", "href", "action", "hx-get", "hx-post"):
                if name in attrs:
                    assert re.match(r"/(?!/)", attrs[name]), (url, tag, attrs)
    css = client.get("/static/dashboard.css").text
    for absolute in ("http://", "https://", "url(", "@import"):
        assert absolute not in css


def test_dashboard_routes_stay_out_of_the_openapi_document(client: TestClient) -> None:
    """None of the dashboard's routes (pages, partials, static files) appears in /openapi.json."""
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith(("/ui", "/static"))]


def test_the_token_field_appears_only_when_a_token_is_required(tmp_path: Path) -> None:
    """With SAGA_API_TOKEN set the pages have the token field (and never the token); without it, no field."""
    secret = "s3cret-token-value"
    settings = Settings.defaults().model_copy(update={"api_token": SecretStr(secret)})
    with Orchestrator(sagas=[Expense], database="memory://", settings=settings) as orch:
        orch.start(Expense, {"employee": "ada"}, saga_id="ada-1")
        with TestClient(create_app(orch)) as client:
            for url in ["/", "/ui/sagas/ada-1"]:
                html = client.get(url).text
                assert Tags(html).find("input", id="token", type="password"), url
                assert secret not in html, url
            refused = client.post("/sagas/ada-1/cancel")
            assert refused.status_code == 401  # the API the buttons call wants it
    with (
        Orchestrator(sagas=[Expense], database="memory://", settings=Settings.defaults()) as orch,
        TestClient(create_app(orch)) as client,
    ):
        assert not Tags(client.get("/").text).find("input", id="token")


def test_the_schedules_page_shows_next_fire_times_last_runs_and_pauses(tmp_path: Path) -> None:
    """/ui/schedules lists each schedule with when it fires, its next tick, the saga its last tick
    started (linked, with its state) and a pause with its reason; GET /schedules serves the same rows."""
    with Orchestrator(sagas=[Expense], database=f"sqlite:///{tmp_path / 's.db'}") as orch:
        orch.schedule(Expense, schedule_id="weekly", cron="0 9 * * MON", tz="Europe/Paris", input={"employee": "ada"})
        orch.schedule(Expense, schedule_id="often", every=90, input={"employee": "bob"})
        started = orch.scheduler.trigger("weekly")
        orch.scheduler.pause("often", "audit <week>")
        with TestClient(create_app(orch)) as client:
            empty_before = client.get("/ui/schedules")
            page = client.get("/ui/schedules")
            api = client.get("/schedules").json()
            partial = client.get("/ui/partials/schedules")
    assert empty_before.status_code == page.status_code == partial.status_code == 200
    rows = {a["data-schedule-id"]: a for a in Tags(page.text).find("tr") if "data-schedule-id" in a}
    assert set(rows) == {"weekly", "often"}
    weekly = page.text.split('data-schedule-id="weekly"')[1].split("</tr>")[0]
    assert "0 9 * * MON (Europe/Paris)" in weekly
    assert f'href="/ui/sagas/{quote(started, safe="")}"' in weekly
    assert 'class="badge state-pending"' in weekly
    assert re.search(r'class="muted next-in">in \d', weekly)
    often = page.text.split('data-schedule-id="often"')[1].split("</tr>")[0]
    assert "every 90 s (UTC)" in often
    assert "paused" in often
    assert "never" in often
    assert "started" in weekly
    assert "audit &lt;week&gt;" in often  # the reason is escaped
    assert 'href="/ui/schedules"' in page.text  # the top bar links to it
    assert 'hx-get="/ui/partials/schedules"' in partial.text
    by_id = {row["schedule_id"]: row for row in api}
    assert by_id["weekly"]["last_saga_id"] == started
    assert [run["saga_id"] for run in by_id["weekly"]["runs"]] == [started]
    assert by_id["often"]["paused"] is True
    assert by_id["often"]["next_fire_at"] is None


def test_the_schedules_page_says_how_to_add_one_when_there_is_none(client: TestClient) -> None:
    """With no schedule the page says so, and how to declare or add one."""
    page = client.get("/ui/schedules")
    assert page.status_code == 200
    assert "No schedules." in page.text
    assert "saga schedules add" in page.text
