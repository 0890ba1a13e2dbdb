"""The ``saga`` command line at its edges: input files, bad settings, secrets, control characters, a database away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result

from orchestrator import Orchestrator
from orchestrator.cli import cli
from orchestrator.errors import ConfigurationError, StorageUnavailable
from tests.test_smoke import Ship

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
SHIP = '{"item": "a"}'

# A saga whose only step fails for good with an error carrying an escape sequence and a second
# line, under a name that carries a newline: what the CLI prints must escape both.
BOOM_APP = textwrap.dedent(
    """
    from pydantic import BaseModel

    from orchestrator import NonRetryable, Orchestrator, Saga, step, wait_for


    class Item(BaseModel):
        item: str


    class Boom(Saga[Item]):
        @step
        def explode(self, item: Item) -> None:
            raise NonRetryable("boom\\x1b[2J\\nsecond line")


    class Park(Saga[Item]):
        @step
        def first(self, item: Item) -> None:
            pass

        approval = wait_for("approved")


    def app() -> Orchestrator:
        return Orchestrator(sagas=[Boom, Park])


    orch = Orchestrator(sagas=[Boom, Park])
    """
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each invocation points structlog at the runner's stderr; put the previous configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CLI runner whose database is a fresh SQLite file and whose app is the test sagas."""
    monkeypatch.setenv("SAGA_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("SAGA_APP", "tests.cli_app:app")
    return CliRunner()


@pytest.fixture
def boom_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The module ``edge_boom_app`` written to tmp_path, which becomes the working directory."""
    name = "edge_boom_app"
    (tmp_path / f"{name}.py").write_text(BOOM_APP, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app adds the working directory
    yield name
    sys.modules.pop(name, None)


def error_lines(result: Result) -> list[str]:
    """The lines of the output that report an error (the engine's ``error:`` or click's ``Error:``)."""
    return [line for line in result.output.splitlines() if line.lower().startswith("error:")]


def saga_ids(run: CliRunner) -> list[str]:
    """The ids ``saga list --json`` shows."""
    listed = run.invoke(cli, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    return [json.loads(line)["saga_id"] for line in listed.stdout.splitlines()]


# 1. --input / --data from a file or standard input


def test_start_reads_input_from_a_file(run: CliRunner, tmp_path: Path) -> None:
    """`--input @path` reads the saga's input object from the file."""
    (tmp_path / "in.json").write_text('{"item": "from file"}', encoding="utf-8")
    result = run.invoke(cli, ["start", "Ship", "--input", f"@{tmp_path / 'in.json'}", "--id", "f-1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "f-1"
    assert json.loads(run.invoke(cli, ["status", "f-1"]).stdout)["state"] == "pending"
    history = run.invoke(cli, ["history", "f-1"]).stdout.splitlines()
    assert json.loads(history[0])["data"]["input"] == {"item": "from file"}


def test_start_reads_input_from_stdin(run: CliRunner) -> None:
    """`--input -` reads the saga's input object from standard input."""
    result = run.invoke(cli, ["start", "Ship", "--input", "-", "--id", "s-1"], input='{"item": "from stdin"}\n')
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "s-1"
    history = run.invoke(cli, ["history", "s-1"]).stdout.splitlines()
    assert json.loads(history[0])["data"]["input"] == {"item": "from stdin"}


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["start", "Ship", "--input"], "--input"),
        (["send", "someone", "approved", "--data"], "--data"),
    ],
)
def test_a_missing_json_file_is_one_clear_error(run: CliRunner, tmp_path: Path, args: list[str], option: str) -> None:
    """`@path` naming a missing file gives one error line naming the option and the file, no traceback."""
    missing = tmp_path / "missing.json"
    result = run.invoke(cli, [*args, f"@{missing}"])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    (line,) = error_lines(result)
    assert option in line
    assert "cannot read" in line
    assert str(missing) in line
    assert "Traceback" not in result.output
    assert saga_ids(run) == []


def test_send_reads_data_from_a_file(run: CliRunner, tmp_path: Path) -> None:
    """`send --data @path` reads the payload from the file (an unexpected event is then refused by the saga)."""
    (tmp_path / "data.json").write_text('{"by": "manager"}', encoding="utf-8")
    assert run.invoke(cli, ["start", "Ship", "--input", SHIP, "--id", "d-1"]).exit_code == 0
    result = run.invoke(cli, ["send", "d-1", "approved", "--data", f"@{tmp_path / 'data.json'}"])
    # The file was read and parsed: the error is the saga's (Ship waits for nothing), not about the file.
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "does not wait for 'approved'" in line
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    refused = run.invoke(cli, ["send", "d-1", "approved", "--data", f"@{bad}"])
    assert refused.exit_code == 2
    assert "must be a JSON object" in refused.output


# 2. --log-level is a choice


def test_an_unknown_log_level_is_a_usage_error_listing_the_choices(run: CliRunner) -> None:
    """`--log-level verbose` exits 2 with click's usage error naming the valid levels, no KeyError."""
    result = run.invoke(cli, ["--log-level", "verbose", "list"])
    assert result.exit_code == 2
    assert not isinstance(result.exception, KeyError)
    (line,) = error_lines(result)
    assert "'verbose' is not one of" in line
    for level in ("debug", "info", "warning", "error", "critical"):
        assert level in line
    assert "Traceback" not in result.output
    assert "KeyError" not in result.output


@pytest.mark.parametrize("level", ["DEBUG", "Warning", "critical"])
def test_log_levels_are_case_insensitive(run: CliRunner, level: str) -> None:
    """`--log-level` takes a level in any case."""
    result = run.invoke(cli, ["--log-level", level, "list"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("SAGA ID")


# 3. Bad SAGA_* settings name their variable


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("SAGA_LOG_JSON", "maybe", "log_json"),
        ("SAGA_LOG_LEVEL", "verbose", "log_level"),
        ("SAGA_CONCURRENCY", "abc", "concurrency"),
    ],
)
def test_a_bad_setting_names_its_environment_variable(
    run: CliRunner, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    """A bad SAGA_* value is one error line naming the variable and the value, not the pydantic field."""
    monkeypatch.setenv(variable, value)
    result = run.invoke(cli, ["list"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    (line,) = error_lines(result)
    assert line.startswith(f"error: {variable}='{value}': ")
    assert field not in line
    assert "validation error" not in result.output
    assert "Traceback" not in result.output


def test_the_log_level_setting_is_case_insensitive(run: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAGA_LOG_LEVEL=WARNING is accepted like warning."""
    monkeypatch.setenv("SAGA_LOG_LEVEL", "WARNING")
    result = run.invoke(cli, ["list"])
    assert result.exit_code == 0, result.output


# 4. memory:// is refused where nothing would outlive the command


@pytest.mark.parametrize(
    "args",
    [["start", "Ship", "--input", SHIP, "--id", "mem-1"], ["status", "x"], ["list"], ["worker", "--drain"]],
    ids=["start", "status", "list", "worker"],
)
def test_memory_url_is_refused_with_a_hint(run: CliRunner, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """SAGA_DATABASE_URL=memory:// is refused with a hint at sqlite://, printing no saga id or table."""
    monkeypatch.setenv("SAGA_DATABASE_URL", "memory://")
    result = run.invoke(cli, args)
    assert result.exit_code != 0
    assert result.stdout == ""
    (line,) = error_lines(result)
    assert "memory://" in line
    assert "sqlite://" in line
    assert "mem-1" not in result.output


# 5. Control characters are refused in ids and escaped in what is printed


def test_a_saga_id_with_control_characters_is_refused_and_nothing_is_written(run: CliRunner) -> None:
    """An id with an escape sequence is refused with an escaped quote of it, and no saga is stored."""
    result = run.invoke(cli, ["start", "Ship", "--input", SHIP, "--id", "a\x1b[31mb"])
    assert result.exit_code == 1
    assert "\x1b" not in result.output
    (line,) = error_lines(result)
    assert "must not contain control characters" in line
    assert "a\\x1b[31mb" in line
    assert result.stdout == ""
    assert saga_ids(run) == []
    listed = run.invoke(cli, ["list"])
    assert listed.stdout.splitlines() == [listed.stdout.strip()]  # the header only
    assert listed.stdout.startswith("SAGA ID")


def test_list_escapes_control_characters_in_names_and_errors(
    run: CliRunner, boom_app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app loaded from the working directory fails a step with an escape sequence; list shows it escaped."""
    monkeypatch.delenv("SAGA_APP")
    app = ["--app", f"{boom_app}:app"]
    started = run.invoke(cli, ["start", "Boom", "--input", SHIP, "--id", "boom-1", *app])
    assert started.exit_code == 0, started.output
    parked = run.invoke(cli, ["start", "Park", "--input", SHIP, "--id", "park-1", *app])
    assert parked.exit_code == 0, parked.output
    drained = run.invoke(cli, ["--json-logs", "worker", "--drain", *app])
    assert drained.exit_code == 0, drained.output
    assert "\x1b" not in drained.output
    cancelled = run.invoke(cli, ["cancel", "park-1", "--reason", "line one\nline two\x1b[2J", *app])
    assert cancelled.exit_code == 0, cancelled.output
    table = run.invoke(cli, ["list", *app])
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.output
    header, *rows = table.stdout.splitlines()  # the newline in the reason did not start a line
    assert header.startswith("SAGA ID")
    (row,) = [r for r in rows if r.startswith("boom-1")]
    (park,) = [r for r in rows if r.startswith("park-1")]
    assert len(rows) == 2
    assert "line one\\nline two\\x1b[2J" in park
    assert "compensated" in row
    assert "NonRetryable: boom\\x1b[2J" in row
    assert "second line" not in table.output  # an error is recorded by its first line
    as_json = run.invoke(cli, ["list", "--json", *app])
    assert "\x1b" not in as_json.output
    errors = {json.loads(line)["saga_id"]: json.loads(line)["error"] for line in as_json.stdout.splitlines()}
    assert errors["boom-1"] == "step 'explode' failed: NonRetryable: boom\x1b[2J"


# 6. --app finds a module in the working directory


def test_app_module_in_the_working_directory_is_found(tmp_path: Path) -> None:
    """`--app mod:orch` loads an Orchestrator from the working directory even when Python did not put it on sys.path."""
    (tmp_path / "edge_boom_app.py").write_text(BOOM_APP, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAGA_") and key != "PYTHONPATH"}
    env["SAGA_DATABASE_URL"] = f"sqlite:///{tmp_path / 'app.db'}"
    # -P: Python itself does not put the working directory on sys.path, so only load_app can.
    bare = subprocess.run(
        [sys.executable, "-P", "-c", "import edge_boom_app"], cwd=tmp_path, env=env, capture_output=True, check=False
    )
    assert bare.returncode != 0
    assert b"ModuleNotFoundError" in bare.stderr
    command = ["start", "Boom", "--input", SHIP, "--id", "cwd-1", "--app", "edge_boom_app:orch"]
    result = subprocess.run(
        [sys.executable, "-P", "-m", "orchestrator", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cwd-1"


# 7. Long ids are quoted by a short prefix


def test_a_huge_saga_id_is_refused_with_a_short_message(run: CliRunner) -> None:
    """A 10,000-character id is refused naming the 200-character limit, in a message under 400 characters."""
    result = run.invoke(cli, ["start", "Ship", "--input", SHIP, "--id", "x" * 10_000])
    assert result.exit_code == 1
    assert len(result.output) < 400
    (line,) = error_lines(result)
    assert "200" in line
    assert "10,000" in line
    assert saga_ids(run) == []


# 8. Passwords are never printed


def test_demo_against_an_unreachable_postgres_hides_the_password(run: CliRunner) -> None:
    """`saga demo` on a PostgreSQL URL where nothing listens fails without printing the password."""
    result = run.invoke(cli, ["demo", "--database", "postgresql://u:secretpw@127.0.0.1:1/db"])
    assert result.exit_code != 0
    assert "secretpw" not in result.output
    assert "secretpw" not in repr(result.exception)
    assert "cannot reach PostgreSQL" in result.output


def test_an_unsupported_scheme_hides_the_password(run: CliRunner) -> None:
    """An unsupported database URL is refused, quoting it with the password masked."""
    result = run.invoke(cli, ["demo", "--database", "mysql://u:secretpw@h/db"])
    assert result.exit_code != 0
    assert "secretpw" not in result.output
    (line,) = error_lines(result)
    assert "unsupported database URL" in line
    assert "u:***@h" in line


def test_a_bad_url_parameter_is_named_without_the_password(run: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad `pool_size` in the URL is named as the URL parameter, not the library setting, with no password."""
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql://u:secretpw@127.0.0.1:5432/test?pool_size=abc")
    result = run.invoke(cli, ["list"])
    assert result.exit_code == 1
    assert "secretpw" not in result.output
    (line,) = error_lines(result)
    assert "pool_size" in line
    assert "POSTGRES_POOL_SIZE" not in line


def test_an_unknown_url_parameter_is_refused_by_name(run: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown `?bogus=1` in a PostgreSQL URL is refused naming the parameter."""
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql://u:secretpw@127.0.0.1:5432/test?bogus=1")
    result = run.invoke(cli, ["list"])
    assert result.exit_code == 1
    assert "secretpw" not in result.output
    (line,) = error_lines(result)
    assert "unknown parameter 'bogus'" in line


@pytest.mark.postgres
def test_demo_header_masks_the_password(run: CliRunner, pg_server: str) -> None:
    """`saga demo` on PostgreSQL with a password in the URL runs and shows *** in its place."""
    import psycopg

    schema = f"t_edge_{uuid.uuid4().hex[:12]}"
    url = pg_server.replace("postgresql://postgres@", "postgresql://postgres:secretpw@", 1) + f"?schema={schema}"
    assert "secretpw" in url, "the test server URL is expected to be postgresql://postgres@..."
    try:
        result = run.invoke(cli, ["demo", "--count", "3", "--database", url])
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert result.exit_code == 0, result.output
    assert "secretpw" not in result.output
    header = result.stdout.splitlines()[0]
    assert header.startswith("sagaworks demo: 3 sagas on postgresql://postgres:***@")
    assert f"schema={schema}" in header


# 9. A database that is away is not a configuration error


def test_start_against_an_unreachable_database_is_one_line(run: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """`saga start` with PostgreSQL away exits 1 with one `error:` line saying it cannot reach it."""
    monkeypatch.setenv("SAGA_DATABASE_URL", UNREACHABLE_PG)
    result = run.invoke(cli, ["start", "Ship", "--input", SHIP])
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.output.splitlines()
    assert line.startswith("error: cannot reach PostgreSQL at 127.0.0.1:1")


def test_the_api_raises_storage_unavailable_not_a_configuration_error() -> None:
    """Orchestrator.start with PostgreSQL away raises StorageUnavailable, which is no ConfigurationError."""
    orch = Orchestrator(sagas=[Ship], database=UNREACHABLE_PG)
    with pytest.raises(StorageUnavailable, match="cannot reach PostgreSQL") as caught:
        orch.start(Ship, {"item": "a"})
    assert not isinstance(caught.value, ConfigurationError)
    assert caught.value.transient


def test_a_worker_waits_for_an_unreachable_database_and_stops_on_sigterm(tmp_path: Path) -> None:
    """A worker with PostgreSQL away keeps running, logs one JSON warning, and exits 0 soon after SIGTERM."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAGA_")}
    env.update(
        SAGA_DATABASE_URL=UNREACHABLE_PG,
        SAGA_APP="tests.cli_app:app",
        SAGA_LOG_JSON="true",
        SAGA_POLL_INTERVAL="0.05",  # backoff 0.05, 0.1, 0.2, ...: several retries in a second
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        worker = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "worker"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 10
            while b"storage unreachable" not in log.read_bytes():
                assert worker.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            time.sleep(1.0)  # a few more failed attempts
            assert worker.poll() is None, log.read_text()
            worker.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            stdout, _ = worker.communicate(timeout=10)
            elapsed = time.monotonic() - signalled
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert worker.returncode == 0, log.read_text()
    assert elapsed < 10
    assert stdout == b""
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    unreachable = [e for e in events if "storage unreachable" in e["event"]]
    assert len(unreachable) == 1
    assert unreachable[0]["level"] == "warning"
    assert "cannot reach PostgreSQL" in unreachable[0]["error"]
    assert any(e.get("signal") == "SIGTERM" for e in events)


# 10. cancel --no-compensate and resolve


def test_cancel_without_compensation_ends_the_saga(run: CliRunner) -> None:
    """`cancel --no-compensate` ends a saga cancelled, its last event SagaTerminated; a second one is refused."""
    assert run.invoke(cli, ["start", "Ship", "--input", SHIP, "--id", "c-1"]).exit_code == 0
    result = run.invoke(cli, ["cancel", "c-1", "--no-compensate", "--reason", "by hand"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "ended 'c-1'"
    assert json.loads(run.invoke(cli, ["status", "c-1"]).stdout)["state"] == "cancelled"
    last = json.loads(run.invoke(cli, ["history", "c-1"]).stdout.splitlines()[-1])
    assert last["type"] == "SagaTerminated"
    assert last["data"]["reason"] == "by hand"
    assert run.invoke(cli, ["worker", "--drain"]).exit_code == 0
    assert json.loads(run.invoke(cli, ["status", "c-1"]).stdout)["state"] == "cancelled"  # no step ran after
    again = run.invoke(cli, ["cancel", "c-1", "--no-compensate"])
    assert again.exit_code == 1
    assert "nothing to end" in again.output


def test_resolve_on_a_saga_that_is_not_failed_is_refused(run: CliRunner) -> None:
    """`resolve` on a pending saga exits 1 with one error line saying only a failed compensation can be resolved."""
    assert run.invoke(cli, ["start", "Ship", "--input", SHIP, "--id", "r-1"]).exit_code == 0
    result = run.invoke(cli, ["resolve", "r-1", "pick"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line == "error: saga 'r-1' is pending; only a failed compensation can be resolved"
    last = json.loads(run.invoke(cli, ["history", "r-1"]).stdout.splitlines()[-1])
    assert last["type"] == "SagaStarted"  # nothing was recorded


@pytest.mark.parametrize("args", [["worker", "--drain"], ["list"], ["status", "x"], ["projections", "rebuild"]])
def test_commands_need_an_app_and_say_how_to_give_one(
    run: CliRunner, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Without --app or SAGA_APP a command refuses with a hint, instead of running the demo catalogue."""
    monkeypatch.delenv("SAGA_APP")
    result = run.invoke(cli, args)
    assert result.exit_code == 2
    assert "needs --app module:attribute" in result.output
    assert "sagas:app" in result.output


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(run: CliRunner) -> None:
    """`saga serve --host 0.0.0.0` without SAGA_API_TOKEN refuses to start, saying how to fix it."""
    result = run.invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "18099"])
    assert result.exit_code == 2
    assert "SAGA_API_TOKEN" in result.output
