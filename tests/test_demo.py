"""``saga demo``: it finishes, exits 0 and shows a mix of outcomes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator import SagaState
from sagas.demo import run_demo


def test_demo_ends_with_completed_compensated_and_cancelled_sagas(tmp_path: Path) -> None:
    """The demo's sagas all finish: most complete, the sold-out trip and the huge order compensate, one is rejected."""
    statuses = run_demo(f"sqlite:///{tmp_path / 'demo.db'}", 12)
    states = {s.saga_id.rsplit("-", 1)[-1]: s.state for s in statuses}
    assert all(state.terminal for state in states.values())
    assert states["0"] is SagaState.COMPENSATED  # sold-out flight
    assert states["4"] is SagaState.COMPENSATED  # more lamps than the warehouse holds
    assert states["11"] is SagaState.CANCELLED  # the rejected expense claim
    assert sum(state is SagaState.COMPLETED for state in states.values()) == 8


def test_saga_demo_command_exits_zero_on_the_default_sqlite_file(tmp_path: Path) -> None:
    """`saga demo` in an empty directory uses the SQLite default file, prints the final table and exits 0."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAGA_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--count", "6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sagaworks.db").exists()
    assert "SAGA ID" in result.stdout
    assert "completed" in result.stdout
