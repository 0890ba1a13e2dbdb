"""The ``saga serve`` subprocess of the ``http`` workload, on the bench's database.

It runs ``python -m orchestrator --log-level warning serve --app orchestrator.bench.workloads:app``
on a free loopback port, with a token of its own (so that the caller's ``SAGA_API_TOKEN`` does
not matter, and the starts pay for the token check as real ones do). ``with ServeProcess(...)``
waits for ``GET /healthz`` to answer 200, and on the way out always ends the process: SIGTERM,
then SIGKILL if it has not exited within a few seconds.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import IO, Any

import httpx

SERVE_APP = "orchestrator.bench.workloads:app"
STOP_SECONDS = 10.0
"""How long the server has after SIGTERM before it is killed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds a live process has used so far (None where ``/proc`` is not there)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak resident set size in MiB (None where ``/proc`` is not there)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class ServeProcess:
    """One ``saga serve`` subprocess; a context manager that starts it and always ends it."""

    def __init__(self, database_url: str, env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.env = env or {}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self.headers = {"Authorization": f"Bearer {self.token}"}
        """What every request sends: the server's token (only changes need it)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr: IO[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the server and return once ``GET /healthz`` answers 200 (else stop it and raise)."""
        self.stderr = tempfile.TemporaryFile(prefix="saga-bench-serve-")  # noqa: SIM115 - stop() closes it
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--log-level",
                "warning",
                "serve",
                "--app",
                SERVE_APP,
                "--port",
                str(self.port),
            ],
            env={**os.environ, **self.env, "SAGA_DATABASE_URL": self.database_url, "SAGA_API_TOKEN": self.token},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(self.describe_failure())
                try:
                    response = client.get("/healthz")
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text[:200]}"
                except httpx.TransportError as error:
                    last = repr(error)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"saga serve not healthy after {timeout:.0f} s: {last}\n{self.output()}")
                time.sleep(0.05)

    def alive(self) -> bool:
        """Whether the server still runs."""
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """The last lines the server wrote to stderr."""
        if self.stderr is None or self.stderr.closed:
            return ""
        self.stderr.seek(0)
        return "\n".join(self.stderr.read().decode(errors="replace").splitlines()[-20:])

    def describe_failure(self) -> str:
        """What the server said before it died, for an error message."""
        code = self.process.returncode if self.process is not None else None
        return f"saga serve exited with {code}:\n{self.output()}"

    def figures(self) -> dict[str, Any]:
        """The live server's CPU seconds so far and its peak RSS (None where ``/proc`` is not there)."""
        assert self.process is not None
        return {"cpu_s": cpu_seconds(self.process.pid), "peak_rss_mb": peak_rss_mb(self.process.pid)}

    def stop(self) -> None:
        """SIGTERM the server, and kill it if it has not exited within ``STOP_SECONDS``; idempotent."""
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    print(
                        f"warning: saga serve {process.pid} did not stop within {STOP_SECONDS:.0f} s of SIGTERM;"
                        " killed it",
                        file=sys.stderr,
                    )
                except BaseException:  # interrupted while waiting: do not leave it behind
                    process.kill()
                    process.wait()
                    raise
        finally:
            if self.stderr is not None:
                self.stderr.close()
