"""Drain: the router's shutdown state. After SIGTERM it takes no new requests and finishes the ones it serves.

`k2serve router` and `k2serve serve` begin a drain on the first SIGTERM or Ctrl-C: /ready answers 503 (a load
balancer stops sending), new API requests get a 503 that tells the client to retry (another replica takes
them), responses close their connections, and the server stops once no API request is in flight or the
grace period has passed. Requests in flight keep their worker groups, migrations included.
"""

from __future__ import annotations

import asyncio
import time


class Drain:
    """Whether the router drains, and how many API requests it is serving (counted by DrainMiddleware)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def begin(self) -> None:
        """Take no new requests from now on."""
        self.draining = True

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until no API request is in flight (True) or `timeout_s` has passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.in_flight == 0
