"""DrainingServer: uvicorn serving the router app, draining it on the first SIGTERM or Ctrl-C.

uvicorn's own shutdown closes the listening socket at once (new connections are refused, readiness probes
fail with a connection error) and then waits for open connections. A router behind a Service should instead
keep answering while endpoints update: on the first signal the app's Drain begins (router/drain.py: /ready
503, new API requests 503 with `connection: close`, the requests in flight go on), and the server stops when
none is left or after the grace period; uvicorn then has a second to close what remains. A second signal
stops at once (uvicorn's behaviour: stop, and a second Ctrl-C forces it).
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """Serves `app` (a router app: its RouterContext on app.state.ctx) on host:port; drains for `drain_s`."""

    def __init__(self, app, host: str, port: int, drain_s: float):
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                        timeout_graceful_shutdown=min(1.0, drain_s), lifespan="off"))
        self.ctx = app.state.ctx
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: the first signal drains, a later one is uvicorn's (stop; Ctrl-C again: force)."""
        if self.ctx.drain.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised once the server has stopped, as uvicorn does
        self.ctx.drain.begin()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.draining(True)
        self._drainer = self._loop.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        in_flight = self.ctx.drain.in_flight
        log.warning("router draining: %d request(s) in flight, at most %.0fs", in_flight, self.drain_s)
        if not await self.ctx.drain.wait_idle(self.drain_s):
            log.warning("router drain: %d request(s) still in flight after %.0fs; stopping",
                        self.ctx.drain.in_flight, self.drain_s)
        self.should_exit = True
