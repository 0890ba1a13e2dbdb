"""Crash and scale tests with real worker processes: SIGKILL mid-step, and two workers sharing load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from orchestrator import Orchestrator, SagaNotFound, SagaState, Settings
from tests.crash_app import SlowMiddle, ThreeSteps

pytestmark = pytest.mark.slow


def spawn_worker(database_url: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A ``saga worker`` subprocess with a short lease, so a dead worker's step is retaken fast."""
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": database_url,
        "SAGA_LEASE_SECONDS": "2",
        "SAGA_POLL_INTERVAL": "0.1",
        "CRASH_LOG": str(log),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--log-level",
            "warning",
            "worker",
            "--app",
            "tests.crash_app:app",
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def effects(log: Path) -> list[str]:
    """The side-effect lines written so far."""
    return log.read_text().splitlines() if log.exists() else []


def wait_for_line(log: Path, prefix: str, timeout: float = 30.0) -> None:
    """Block until a side-effect line starting with ``prefix`` appears."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in effects(log)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {prefix!r} effect after {timeout} s: {effects(log)}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a worker and wait for it to finish its attempts and exit cleanly."""
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr.decode()


def test_killed_worker_step_is_rerun_and_recorded_once(durable_url: str, tmp_path: Path) -> None:
    """A worker SIGKILLed mid-step: another worker re-runs that step and finishes the saga, once."""
    log = tmp_path / "effects.log"
    with Orchestrator(sagas=[SlowMiddle, ThreeSteps], database=durable_url, settings=Settings.defaults()) as orch:
        saga_id = orch.start(SlowMiddle, {"hold": 60.0}, saga_id="crash-1")
        first = spawn_worker(durable_url, log)
        try:
            wait_for_line(log, "slow-start crash-1 attempt=1")
        finally:
            first.kill()
            first.communicate(timeout=10)
        assert first.returncode == -signal.SIGKILL
        second = spawn_worker(durable_url, log)
        try:
            status = orch.wait(saga_id, timeout=60)
        finally:
            stop(second)
        history = orch.history(saga_id)

    assert status.state is SagaState.COMPLETED
    lines = [line.split(" pid=")[0] for line in effects(log)]
    assert lines.count("first crash-1 attempt=1") == 1  # the step before ran exactly once
    assert lines.count("slow-start crash-1 attempt=1") == 1
    assert "slow-done crash-1 attempt=1" not in lines  # the killed attempt never finished
    assert lines.count("slow-done crash-1 attempt=2") == 1  # re-run: at least once in all
    assert lines.count("last crash-1 attempt=1") == 1
    outcomes = Counter((e.type, e.step) for e in history if e.type in ("StepSucceeded", "StepAttemptFailed"))
    assert outcomes == {
        ("StepSucceeded", "first"): 1,
        ("StepAttemptFailed", "slow"): 1,  # the lost attempt counts as an attempt
        ("StepSucceeded", "slow"): 1,
        ("StepSucceeded", "last"): 1,
    }
    lost = next(e for e in history if e.type == "StepAttemptFailed")
    assert "lease expired" in lost.data["error"]
    assert [s.attempts for s in status.steps] == [1, 2, 1]


@pytest.mark.postgres
def test_two_workers_share_500_sagas(pg_url: str, tmp_path: Path) -> None:
    """Two worker processes on PostgreSQL finish 500 sagas; every step outcome is recorded exactly once."""
    log = tmp_path / "effects.log"
    count = 500
    with Orchestrator(sagas=[SlowMiddle, ThreeSteps], database=pg_url, settings=Settings.defaults()) as orch:
        workers = [spawn_worker(pg_url, log) for _ in range(2)]
        try:
            ids = [orch.start(ThreeSteps, {"n": i}, saga_id=f"many-{i}") for i in range(count)]
            deadline = time.monotonic() + 120
            while len(orch.list(state="completed", limit=count)) < count:
                assert time.monotonic() < deadline, "sagas left behind"
                assert all(w.poll() is None for w in workers), "a worker died"
                time.sleep(0.2)
        finally:
            for worker in workers:
                stop(worker)
        histories = {saga_id: orch.history(saga_id) for saga_id in ids}

    for saga_id, history in histories.items():
        succeeded = Counter(e.step for e in history if e.type == "StepSucceeded")
        assert succeeded == {"one": 1, "two": 1, "three": 1}, saga_id
        assert history[-1].type == "SagaCompleted"
    lines = effects(log)
    assert len({line.split(" pid=")[1] for line in lines}) == 2  # both workers took part
    steps = Counter(line.split(" pid=")[0] for line in lines)
    assert len(steps) == 3 * count  # every step ran


def test_worker_process_beside_poison_sagas_completes_the_rest_and_stops_on_sigterm(
    durable_url: str, tmp_path: Path
) -> None:
    """A real ``saga worker`` with poison sagas in its batches completes the good ones (one attempt per
    step), sets the broken one aside, and exits cleanly within 10 s of SIGTERM."""
    from datetime import UTC, datetime

    from orchestrator.aggregate import SagaAggregate
    from tests.poison_app import Pick
    from tests.test_poison import corrupt_first_event

    with Orchestrator(sagas=[Pick], database=durable_url, settings=Settings.defaults()) as orch:
        good = [orch.start(Pick, {"name": f"g{i}"}, saga_id=f"good-{i}") for i in range(6)]
        orch.start(Pick, {"output": "nul"}, saga_id="unstorable-output")
        orch.repository.save([SagaAggregate.start(Pick, "stale-input", {"name": 42}, datetime.now(UTC), None)])
        orch.start(Pick, {}, saga_id="broken-history")
        corrupt_first_event(orch, "broken-history")
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": durable_url,
        "SAGA_POLL_INTERVAL": "0.1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--json-logs", "worker", "--app", "tests.poison_app:app"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with Orchestrator(sagas=[Pick], database=durable_url, settings=Settings.defaults()) as orch:
            deadline = time.monotonic() + 30
            ids = [*good, "unstorable-output", "stale-input"]
            while not all(orch.status(s).state.terminal for s in ids):
                assert time.monotonic() < deadline, [(s, orch.status(s).state) for s in ids]
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                time.sleep(0.1)
            while orch.status("broken-history").problem is None:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for saga_id in good:
                status = orch.status(saga_id)
                assert status.state is SagaState.COMPLETED
                assert [s.attempts for s in status.steps] == [1, 1, 1]
            assert orch.status("unstorable-output").state is SagaState.COMPENSATED
            assert orch.status("stale-input").state is SagaState.COMPENSATED
        begun = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert time.monotonic() - begun < 10
        assert process.returncode == 0, stderr.decode()
        assert b"worker round failed" not in stderr
        assert b"saga set aside" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_triggered_sagas_start_once_when_a_worker_is_killed_mid_processing(durable_url: str, tmp_path: Path) -> None:
    """Two worker processes run the trigger processor over 60 events; one is SIGKILLed half-way; each
    matching event still starts exactly one saga, and all of them complete."""
    from tests.test_triggers import ClaimSubmitted, ExpenseApproval

    with Orchestrator(sagas=[ExpenseApproval], database=durable_url, settings=Settings.defaults()) as orch:
        for i in range(60):
            orch.emit(ClaimSubmitted(claim_id=f"k{i}", employee="ada", amount=400 + 10 * i), event_id=f"kill-{i}")
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": durable_url,
        "SAGA_POLL_INTERVAL": "0.05",
        "SAGA_LEASE_SECONDS": "2",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "--log-level",
        "warning",
        "worker",
        "--app",
        "tests.trigger_app:app",
    ]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    survivor = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.6)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        matching = [f"ExpenseApproval.on.ClaimSubmitted:kill-{i}" for i in range(60) if 400 + 10 * i > 500]
        with Orchestrator(sagas=[ExpenseApproval], database=durable_url, settings=Settings.defaults()) as orch:
            deadline = time.monotonic() + 40
            while True:
                statuses = orch.list()
                # Each triggered saga's step emits one follow-up claim, which starts one more saga.
                if len(statuses) == 2 * len(matching) and all(s.state is SagaState.COMPLETED for s in statuses):
                    break
                assert time.monotonic() < deadline, (len(statuses), 2 * len(matching))
                time.sleep(0.1)
            ids = {s.saga_id for s in statuses}
            assert set(matching) <= ids
            follow_ups = [s for s in statuses if s.saga_id not in matching]
            assert len(follow_ups) == len(matching)
            skipped = [e for e in orch.events() if e.triggers and "skipped" in e.triggers[0]]
            assert len(skipped) == 60 - len(matching)
    finally:
        stop(survivor)
        if victim.poll() is None:
            victim.kill()


def test_a_process_killed_during_group_commits_keeps_every_start_that_returned(
    durable_url: str, tmp_path: Path
) -> None:
    """SIGKILL of a process whose 8 threads start sagas one start() each (calls queued behind an
    open transaction): every start that returned is durable; at most the calls in flight are lost."""
    Orchestrator(sagas=[ThreeSteps], database=durable_url).open().close()  # the schema, before the starter
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    starter = subprocess.Popen(
        [sys.executable, "-m", "tests.starter_app", durable_url], stdout=subprocess.PIPE, env=env
    )
    assert starter.stdout is not None
    returned: list[str] = []
    while len(returned) < 300:  # well into the burst: batches are being written
        line = starter.stdout.readline()
        assert line, "the starter exited early"
        returned.append(line.decode().strip())
    starter.send_signal(signal.SIGKILL)
    returned += [line.decode().strip() for line in starter.stdout.read().splitlines()]
    starter.wait(10)
    starter.stdout.close()
    missing = []
    with Orchestrator(sagas=[ThreeSteps], database=durable_url) as orch:
        for saga_id in returned:
            try:
                assert orch.status(saga_id).state is SagaState.PENDING
            except SagaNotFound:
                missing.append(saga_id)
    assert missing == []
    assert len(returned) >= 300
