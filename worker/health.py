"""Whether a worker can generate: EngineHealth and the StepClock a hang is measured by (no torch here).

A rank that hangs (stopped, stuck in a collective) is worse than one that dies: nothing fails, every
request simply stops. So health is not "the process answers" but "the step loop makes progress through
every rank": the engine thread stamps the StepClock around each step and each heartbeat (an idle
engine's no-op step through every rank), and a step that has been running for longer than the hang
timeout means the group cannot generate.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

SERVING, DRAINING, FAILED = "serving", "draining", "failed"


@dataclass(frozen=True)
class EngineHealth:
    """`state`: "serving" (can generate), "draining" (finishing its requests, taking no new ones) or
    "failed" (hung, broken collectives or stopped; `reason` says which)."""

    state: str
    reason: str = ""

    @property
    def is_serving(self) -> bool:
        return self.state == SERVING


class StepClock:
    """When the step running now started (thread-safe): `with clock.running(): step()`."""

    def __init__(self, now=time.monotonic):
        self._now = now
        self._started: float | None = None
        self._lock = threading.Lock()

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._started = self._now()
        try:
            yield
        finally:
            with self._lock:
                self._started = None

    def stalled_for(self) -> float:
        """Seconds the running step has taken so far (0 when none runs)."""
        with self._lock:
            return 0.0 if self._started is None else self._now() - self._started
