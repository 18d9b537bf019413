"""How long Orthanc is unreachable, seen from outside: one poller for every benchmark.

A thread GETs ``/system`` every ``interval`` seconds (20 ms by default), each time on a new
connection with a 1 s timeout, as a client would. The downtime is the longest interval between
two answers that has an unanswered probe in it: 0.0 when every probe was answered.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass

POLL_INTERVAL = 0.02                        # seconds between two GET /system


class PollerError(RuntimeError):
    """Orthanc did not answer before the measurement began."""


@dataclass
class Outage:
    """What the poller saw: the longest interval without an answer (monotonic seconds) and
    when it began and ended (wall clock, to line it up with other logs), the number of
    outages and of probes, and how many probes were not answered."""
    seconds: float
    began: float
    ended: float
    outages: int
    probes: int
    failures: int = 0


def answers(port: int, path: str = "/system", timeout: float = 1.0, host: str = "127.0.0.1") -> bool:
    """One probe: GET ``path`` on a new connection; True on HTTP 200."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Poller:
    """GET /system every ``interval`` in a thread; records the longest interval between two
    answers. Use as a context manager around the procedure; ``result`` is set on exit, and
    ``still_down`` tells whether the last probe went unanswered."""

    def __init__(self, port: int, interval: float = POLL_INTERVAL, path: str = "/system") -> None:
        self.port, self.interval, self.path = port, interval, path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()
        self.result: Outage | None = None
        self._longest = (0.0, 0.0, 0.0)
        self._last_ok: tuple[float, float] | None = None  # (monotonic, wall)
        self._down = False
        self._outages = self._probes = self._failures = 0
        self.still_down = False

    def _probe(self) -> bool:
        return answers(self.port, self.path)

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            ok = self._probe()
            mono, wall = time.monotonic(), time.time()
            with self._lock:
                self._probes += 1
                if ok:
                    if self._down and self._last_ok is not None:
                        gap = mono - self._last_ok[0]
                        if gap > self._longest[0]:
                            self._longest = (gap, self._last_ok[1], wall)
                    self._down = False
                    self._last_ok = (mono, wall)
                else:
                    self._failures += 1
                    if not self._down:
                        self._down = True
                        self._outages += 1
            next_tick = max(next_tick + self.interval, time.monotonic())  # no burst after a slow probe
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def __enter__(self) -> "Poller":
        if not self._probe():
            raise PollerError(f"Orthanc does not answer on port {self.port} before the measurement")
        self._thread.start()
        while self._last_ok is None:
            time.sleep(0.005)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)  # a few answers after the procedure, so the end of the outage is seen
        self._stop.set()
        self._thread.join()
        with self._lock:
            self.still_down = self._down
            gap, began, ended = self._longest
            self.result = Outage(gap, began, ended, self._outages, self._probes, self._failures)
