"""Concurrent callers for the ``http`` workload: starts through the Python API and over HTTP, and polls.

Each caller is a thread of the bench process that makes one call at a time, the way a web
handler or a job calls the orchestrator: through ``orch.start()`` (one saga per call), or
through its own keep-alive HTTP/1.1 connection to a ``saga serve``. Every caller makes a few
calls first that are not timed (connections, pools, caches), then all start together; the
latency of each call is timed on the caller's side.

The HTTP callers use the standard library's ``http.client``, not httpx: httpx spends about
0.45 ms of CPU per request, as much as the server, on the same two cores, and eight threads of
it contending for one GIL reach a p99 near 10 ms against a server that answers at once. With
it the bench measured its own client; ``http.client`` costs about 0.06 ms per request.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import orjson

from orchestrator import Orchestrator, Saga
from orchestrator.bench.phases import percentile
from orchestrator.bench.server import ServeProcess

CLIENT_WARMUP = 3
"""Calls each caller makes, untimed, before the measured ones."""
Call = Callable[[int], Any]
"""One call of a caller; it gets a number unique in the phase (the saga's input, say)."""


@dataclass
class Timed:
    """What the callers of one phase did: each call's result and latency, and the phase's wall time."""

    results: list[Any]
    latencies_ms: list[float]
    wall_s: float
    cpu_s: float
    """CPU seconds the bench process (the callers) used during the phase."""

    @property
    def calls(self) -> int:
        """Calls timed."""
        return len(self.latencies_ms)

    @property
    def per_s(self) -> float:
        """Calls per second of wall time."""
        return self.calls / self.wall_s if self.wall_s > 0 else float("inf")

    def p(self, q: float) -> float:
        """The ``q``-th percentile of the latencies, in ms."""
        return percentile(self.latencies_ms, q)


def process_cpu() -> float:
    """CPU seconds this process has used (every thread)."""
    return time.process_time()


def run_clients(
    clients: int,
    connect: Callable[[int], AbstractContextManager[Call]],
    *,
    count: int | None = None,
    seconds: float | None = None,
    warmup: int = CLIENT_WARMUP,
) -> Timed:
    """``clients`` threads call at once: ``count`` calls in all (shared evenly), else for ``seconds``.

    ``connect(index)`` gives caller ``index`` its call (and whatever it holds, such as a
    connection, for the phase). The first error of any caller stops them all and is raised.
    """
    if count is None and seconds is None:
        raise ValueError("give count or seconds")
    shares = [count // clients + (1 if i < count % clients else 0) for i in range(clients)] if count else None
    ready = threading.Barrier(clients + 1)
    stop = threading.Event()
    results: list[list[Any]] = [[] for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def caller(index: int) -> None:
        try:
            with connect(index) as call:
                for n in range(warmup):
                    call(-1 - index * warmup - n)
                ready.wait()
                first = sum(shares[:index]) if shares else index * 1_000_000_000
                deadline = time.perf_counter() + seconds if seconds is not None else None
                n = 0
                while not stop.is_set():
                    if shares is not None and n >= shares[index]:
                        break
                    began = time.perf_counter()
                    if deadline is not None and began >= deadline:
                        break
                    result = call(first + n)
                    latencies[index].append((time.perf_counter() - began) * 1000)
                    results[index].append(result)
                    n += 1
        except BaseException as error:  # reported by the calling thread
            errors.append(error)
            stop.set()
            ready.abort()

    threads = [threading.Thread(target=caller, args=(i,), name=f"bench-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    with suppress(threading.BrokenBarrierError):  # a caller failed: its error is raised below
        ready.wait()
    began, cpu = time.perf_counter(), process_cpu()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - began, process_cpu() - cpu
    if errors:
        raise RuntimeError(f"a bench client failed: {errors[0]!r}") from errors[0]
    return Timed([r for part in results for r in part], [ms for part in latencies for ms in part], wall, cpu)


def python_starts(orch: Orchestrator, saga: type[Saga[Any]], count: int, clients: int) -> Timed:
    """``count`` sagas started one per ``orch.start()`` call, from ``clients`` threads; results are ids."""

    def connect(index: int) -> AbstractContextManager[Call]:
        return nullcontext(lambda n: orch.start(saga, {"n": n}))

    return run_clients(clients, connect, count=count)


@dataclass
class Answer:
    """What the server answered a caller."""

    status_code: int
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode(errors="replace")


class HttpCaller:
    """One caller's keep-alive connection to the server, sending the server's token with every request."""

    def __init__(self, server: ServeProcess, timeout: float = 30) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.headers = server.headers

    def get(self, path: str) -> Answer:
        """``GET path``."""
        return self._request("GET", path, None, self.headers)

    def post(self, path: str, json: Any) -> Answer:
        """``POST path`` with ``json`` as the body."""
        return self._request("POST", path, orjson.dumps(json), {**self.headers, "Content-Type": "application/json"})

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()  # read whole, so that the connection is kept for the next request
        return Answer(response.status, {name.lower(): value for name, value in response.getheaders()}, data)

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


@contextmanager
def http_client(server: ServeProcess) -> Iterator[HttpCaller]:
    """A client of its own for one caller: one keep-alive connection to the server."""
    caller = HttpCaller(server)
    try:
        yield caller
    finally:
        caller.close()


def http_starts(server: ServeProcess, saga: type[Saga[Any]], count: int, clients: int) -> Timed:
    """``count`` sagas started by ``POST /sagas/{name}`` from ``clients`` callers; results are the Locations."""
    path = f"/sagas/{saga.name}"

    def start(client: HttpCaller, n: int) -> str:
        response = client.post(path, json={"n": n})
        location = response.headers.get("location")
        if response.status_code != 202 or not location:
            raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text[:300]}")
        return str(location)

    @contextmanager
    def connect(index: int) -> Iterator[Call]:
        with http_client(server) as client:
            yield lambda n: start(client, n)

    return run_clients(clients, connect, count=count)


def http_polls(server: ServeProcess, locations: list[str], clients: int, seconds: float) -> Timed:
    """``GET`` of random saga status URLs (of ``locations``) from ``clients`` callers for ``seconds``."""

    def poll(client: HttpCaller, rng: random.Random) -> int:
        location = rng.choice(locations)
        response = client.get(location)
        if response.status_code not in (200, 202):
            raise RuntimeError(f"GET {location} answered {response.status_code}: {response.text[:300]}")
        return response.status_code

    @contextmanager
    def connect(index: int) -> Iterator[Call]:
        rng = random.Random(index)
        with http_client(server) as client:
            yield lambda n: poll(client, rng)

    return run_clients(clients, connect, seconds=seconds)
