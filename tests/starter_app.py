"""A process that starts sagas from 8 threads, one ``start()`` each, as fast as group commit lets
it, and prints each id once its call has returned; the crash test kills it with SIGKILL."""

from __future__ import annotations

import sys
import threading

from orchestrator import Orchestrator
from tests.crash_app import ThreeSteps


def main(database_url: str) -> None:
    orch = Orchestrator(sagas=[ThreeSteps], database=database_url).open()
    printing = threading.Lock()

    def submit(k: int) -> None:
        for n in range(100_000):
            saga_id = orch.start(ThreeSteps, {"n": n}, saga_id=f"s{k}-{n}")
            with printing:
                print(saga_id, flush=True)

    threads = [threading.Thread(target=submit, args=(k,), daemon=True) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1])
