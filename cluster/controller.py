"""Controller: a Ray driver that starts the configured worker groups, watches them and replaces failed ones.

Live groups are published as `GroupEndpoint`s: in-process through `endpoints()`, and over HTTP at
`GET /v1/groups` on the discovery port, which routers running elsewhere poll.

A group's health is `WorkerGroup.health()`: failed (a rank died, hangs, or rank 0's engine failed),
draining (rank 0 finishes its requests after a SIGTERM) or serving. The watcher publishes a group that is
not serving as unhealthy at once and replaces a failed one (or one still draining long after its drain
timeout). `restart` drains one group and starts it again; `rolling_restart` does that to each group in
turn, so that the others serve meanwhile.

The lock guards only what `endpoints()` reads. Stopping a group (which may wait on a dead rank) and
starting one (minutes for K2) happen outside it, so that anything asking for the groups (a router's
event loop, the discovery endpoint) never waits on Ray or a dead peer; a per-group lock keeps the watcher
away from a group while it is being replaced or restarted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

from k2serve.cluster.config import ClusterConfig, GroupSection
from k2serve.cluster.group import GroupHealth, WorkerGroup
from k2serve.cluster.rank_actor import ServeSpec
from k2serve.worker.health import DRAINING, FAILED, SERVING

log = logging.getLogger(__name__)

DRAIN_OVERDUE_S = 30.0  # a group still draining this long after its drain timeout is replaced


@dataclass(frozen=True)
class GroupEndpoint:
    name: str
    address: str  # rank 0's gRPC host:port
    healthy: bool
    generation: int  # increments each time the group is replaced
    pids: tuple[int, ...] = ()  # each rank's process id, rank order
    metrics_address: str | None = None  # rank 0's Prometheus host:port (GET /metrics), if served


class Group(Protocol):
    """A started, serving incarnation of a group, as the controller uses it (WorkerGroup; tests use fakes)."""

    address: str
    pids: list[int]

    @property
    def metrics_address(self) -> str | None: ...

    def health(self, timeout_s: float = 2.0) -> GroupHealth: ...

    def stop(self, grace_s: float | None = 1.0) -> None: ...


Launcher = Callable[[GroupSection], Group]  # starts and serves a new incarnation of the group described


def worker_group_launcher(config: ClusterConfig, model_dir: str | Path) -> Launcher:
    """Start each incarnation as a WorkerGroup on Ray, serving as the controller section says."""
    ports = config.controller
    spec = ServeSpec(ports.worker_grpc_host, ports.worker_grpc_port, config.model.name,
                     metrics_port=ports.worker_metrics_port, drain_timeout_s=ports.drain_timeout_s,
                     pid_dir=ports.worker_pid_dir, security=config.security)

    def launch(section: GroupSection) -> Group:
        group = WorkerGroup(section, str(model_dir), config.engine)
        try:
            group.start()
            group.serve(spec)
        except BaseException:
            group.stop(None)
            raise
        return group
    return launch


class ManagedGroup:
    """One configured group and its current incarnation."""

    def __init__(self, config: GroupSection):
        self.config = config
        self.group: Group | None = None
        self.generation = 0
        self.healthy = False
        self.draining_since: float | None = None
        self.busy = threading.Lock()  # held while the group is checked, replaced or restarted

    @property
    def name(self) -> str:
        return self.config.name

    def endpoint(self) -> GroupEndpoint | None:
        if self.group is None:
            return None
        return GroupEndpoint(self.name, self.group.address, self.healthy, self.generation, tuple(self.group.pids),
                             self.group.metrics_address)


class Controller:
    """Starts, watches and replaces `config`'s groups; `launch` starts one incarnation (default: Ray)."""

    def __init__(self, config: ClusterConfig, model_dir: str | Path, launch: Launcher | None = None):
        self.config = config
        self.groups = [ManagedGroup(g) for g in config.groups]
        self._launch = launch or worker_group_launcher(config, model_dir)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._restarting = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> "Controller":
        """Start every group (in order), then the watcher thread."""
        for g in self.groups:
            self._install(g, self._launch(g.config))
        self._watcher = threading.Thread(target=self._watch, name="controller-watch", daemon=True)
        self._watcher.start()
        return self

    def endpoints(self) -> list[GroupEndpoint]:
        """The groups running now (never waits on Ray: see the module docstring)."""
        with self._lock:
            return [e for g in self.groups if (e := g.endpoint()) is not None]

    def status(self) -> list[dict]:
        return [asdict(e) for e in self.endpoints()]

    # ---- watching ----

    def _watch(self) -> None:
        interval = self.config.controller.health_interval_s
        while not self._stop.wait(interval):
            for g in self.groups:
                self.check(g)

    def check(self, g: ManagedGroup) -> None:
        """Publish the group's health; replace it when it failed (and replacing is configured). A group
        being replaced or restarted is skipped."""
        if not g.busy.acquire(blocking=False):
            return
        try:
            health = g.group.health() if g.group is not None else GroupHealth(FAILED, "not running")
            self._set_healthy(g, health)
            if self._should_replace(g, health):
                self._replace(g, grace_s=None)
        finally:
            g.busy.release()

    def _should_replace(self, g: ManagedGroup, health: GroupHealth) -> bool:
        if health.state == SERVING or not self.config.controller.replace_dead_groups or self._stop.is_set():
            return False
        if health.state != DRAINING:
            return True
        g.draining_since = g.draining_since or time.monotonic()
        return time.monotonic() - g.draining_since > self.config.controller.drain_timeout_s + DRAIN_OVERDUE_S

    def _set_healthy(self, g: ManagedGroup, health: GroupHealth) -> None:
        healthy = health.state == SERVING
        if g.healthy and not healthy:
            log.warning("group %s generation %d is %s: %s", g.name, g.generation, health.state, health.reason)
        with self._lock:
            g.healthy = healthy
        if health.state != DRAINING:
            g.draining_since = None

    # ---- replacing ----

    def _replace(self, g: ManagedGroup, grace_s: float | None) -> None:
        """Unpublish the group, stop its incarnation (draining for `grace_s`; None: at once) and start a new
        one; a start that fails leaves the group unpublished, to be retried at the next check."""
        with self._lock:
            old, g.group, g.healthy = g.group, None, False
        if old is not None:
            old.stop(grace_s)
        try:
            new = self._launch(g.config)
        except Exception:
            log.exception("group %s could not be started; will retry", g.name)
            return
        self._install(g, new)

    def _install(self, g: ManagedGroup, group: Group) -> None:
        with self._lock:
            g.group, g.generation, g.healthy, g.draining_since = group, g.generation + 1, True, None
        log.info("group %s generation %d serving at %s", g.name, g.generation, group.address)

    def restart(self, name: str, grace_s: float | None = None) -> int:
        """Drain group `name` (for `grace_s`, default controller.drain_timeout_s) and start it again;
        returns its new generation. Raises RuntimeError when the new incarnation does not start."""
        g = self._group(name)
        grace = self.config.controller.drain_timeout_s if grace_s is None else grace_s
        with g.busy:
            log.info("restarting group %s generation %d (drain %.0fs)", name, g.generation, grace)
            self._replace(g, grace)
            if g.group is None:
                raise RuntimeError(f"group {name} did not start again; the controller keeps retrying")
            return g.generation

    def rolling_restart(self, names: list[str] | None = None, grace_s: float | None = None) -> dict[str, int]:
        """Restart the named groups (default: all), one at a time, each serving again before the next
        drains; returns each one's new generation. Raises KeyError for an unknown name (before anything
        stops) and RuntimeError if another rolling restart runs or a group does not start again."""
        names = self._begin_rolling_restart(names)
        try:
            return {name: self._restart_then_pause(name, grace_s) for name in names}
        finally:
            self._restarting.release()

    def start_rolling_restart(self, names: list[str] | None = None, grace_s: float | None = None) -> list[str]:
        """`rolling_restart` on a thread of its own; returns the names it restarts (errors as it raises them
        before anything stops; a group that does not start again ends it, logged)."""
        names = self._begin_rolling_restart(names)

        def run() -> None:
            try:
                for name in names:
                    self._restart_then_pause(name, grace_s)
            except Exception:
                log.exception("rolling restart stopped")
            finally:
                self._restarting.release()
        threading.Thread(target=run, name="rolling-restart", daemon=True).start()
        return names

    @property
    def is_restarting(self) -> bool:
        """Whether a rolling restart runs now."""
        return self._restarting.locked()

    def _restart_then_pause(self, name: str, grace_s: float | None) -> int:
        """Restart one group, then give the routers time to find it before the next one drains."""
        generation = self.restart(name, grace_s)
        self._stop.wait(self.config.controller.restart_pause_s)
        return generation

    def _begin_rolling_restart(self, names: list[str] | None) -> list[str]:
        names = names or [g.name for g in self.groups]
        for name in names:
            self._group(name)  # every name is checked before anything stops
        if not self._restarting.acquire(blocking=False):
            raise RuntimeError("a rolling restart is already running")
        return names

    def _group(self, name: str) -> ManagedGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups]}")

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        for g in self.groups:
            with self._lock:
                group, g.group, g.healthy = g.group, None, False
            if group is not None:
                group.stop()
