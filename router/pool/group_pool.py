"""GroupPool: the worker groups behind one router, with discovery, health, balancing, retries, admission.

The pool keeps one Worker (a WorkerClient) per discovered group and a `Balancer` over them. A background
task (in the serving event loop) refreshes the groups from a discovery source and probes every group's
gRPC health and load each `poll_interval_s`. Each request (`generate`):

1. waits for a slot in `AdmissionControl` (a full queue is a 429; its deadline passing there, a 504),
2. is sent to the group the balancer picks (503 when no group can take it),
3. is re-sent to another group if its group fails (a 500, 502 or 503 from the worker, or a transport
   error): before the first token as a retry (at most `max_attempts` groups), after it as a migration
   (router/pool/migration.py: a continuation after the tokens already streamed, at most `max_migrations`
   times); the client sees one uninterrupted stream. Only when no group is left does the request fail,
   with a 503 naming the groups that failed it (an error event once the stream has begun).

A group that turns unhealthy while it serves requests and has sent nothing for `stall_timeout_s` is hung
(a stopped rank, a stuck collective): its client is closed, which fails its requests, and they migrate. A
group that is only draining keeps streaming, and its requests finish there.

`WorkerPool` is what the request path needs from it; tests give the router fakes of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, Sequence

from pydantic import Field

from k2serve.router.errors import APIError
from k2serve.router.metrics import RouterMetrics
from k2serve.router.pool.admission import AdmissionControl
from k2serve.router.pool.balancer import Backend, BackendSpec, Balancer
from k2serve.router.pool.discovery import Discovery, DiscoveryError, GroupInfo
from k2serve.router.pool.migration import MigrationConfig, Progress
from k2serve.router.pool.worker import GenerateParams, StreamItem, Worker, WorkerError, WorkerModelInfo
from k2serve.router.pool.worker_client import WorkerClient

log = logging.getLogger(__name__)


class GroupPoolConfig(MigrationConfig):
    """How the pool watches its groups, and retries and migrates requests."""

    poll_interval_s: float = Field(1.0, gt=0, description="seconds between discovery refreshes and health/load probes")
    probe_timeout_s: float = Field(2.0, gt=0, description="timeout of one gRPC health check or GetLoad")
    failed_probes_unhealthy: int = Field(2, ge=1, description="consecutive failed health checks that mark a group "
                                         "unhealthy (failed requests also eject it, through the circuit breaker)")
    drain_s: float = Field(30.0, description="a removed group's client is closed when its streams end, or after this")


class _GroupFailed(Exception):
    """The group failed a request that another group may take (a retry or a migration)."""


# Worker statuses that are the group's failure, not the request's: another group may serve it.
_GROUP_FAILURES = frozenset({500, 502, 503})


class WorkerPool(Protocol):
    """The worker groups as the request path sees them (GroupPool; tests use fakes).

    `generate` streams one request's TokenChunks and its Finished, or raises APIError (the router cannot
    place it: 429, 503) or WorkerError (the worker refused or failed it). `model_info` is the served
    model's facts from the first group that answers, None while none does; `health` is every known
    group's health check, in name order.
    """

    def generate(self, params: GenerateParams) -> AsyncIterator[StreamItem]: ...

    async def model_info(self) -> WorkerModelInfo | None: ...

    async def health(self) -> list[bool]: ...


@dataclass
class _Member:
    """A discovered group and the client the pool opened for it."""

    info: GroupInfo
    client: Worker
    failed_probes: int = 0
    last_response: float = 0.0  # time.monotonic() of the last dispatch to the group or item received from it


class GroupPool:
    """Worker groups from `discovery`, balanced by `balancer`, admitted by `admission` (None: unbounded).

    Call `start()` inside the serving event loop (gRPC channels and the poll task belong to it) and
    `close()` when done. `metrics` (a RouterMetrics, optional) receives group health, breaker states,
    dispatches, retries and queue time.
    """

    def __init__(self, discovery: Discovery, balancer: Balancer | None = None,
                 admission: AdmissionControl | None = None, metrics: RouterMetrics | None = None,
                 config: GroupPoolConfig = GroupPoolConfig(),
                 client_factory: Callable[[str], Worker] = WorkerClient):
        self.discovery = discovery
        self.balancer = balancer or Balancer()
        self.admission = admission
        self.metrics = metrics
        self.config = config
        self._client_factory = client_factory
        self._members: dict[str, _Member] = {}
        self._task: asyncio.Task | None = None
        self._refreshed: asyncio.Event | None = None
        self._closing: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- what the request path uses

    async def model_info(self) -> WorkerModelInfo | None:
        """The served model's facts from the first group that answers (after the first refresh)."""
        await self.wait_discovered()
        for worker in self.workers:
            try:
                return await worker.get_model_info()
            except WorkerError:
                continue
        return None

    async def health(self) -> list[bool]:
        """Every current group's health check, in name order."""
        return [await worker.health() for worker in self.workers]

    @property
    def workers(self) -> list[Worker]:
        """The current groups' clients, in name order."""
        return [self._members[n].client for n in sorted(self._members)]

    @property
    def groups(self) -> list[GroupInfo]:
        """The current groups as discovery last reported them, in name order."""
        return [self._members[n].info for n in sorted(self._members)]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "GroupPool":
        """Start the refresh/probe task in the running event loop (idempotent)."""
        if self._task is None:
            self._refreshed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-pool")
        return self

    async def close(self) -> None:
        """Stop polling and close every group client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        members, self._members = list(self._members.values()), {}
        self.balancer.set_backends([])
        await asyncio.gather(*(m.client.close() for m in members), *self._closing, return_exceptions=True)
        await self.discovery.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the poller must survive anything one round throws
                log.exception("group pool refresh failed")
            if self._refreshed is not None:
                self._refreshed.set()
            await asyncio.sleep(self.config.poll_interval_s)

    async def refresh(self) -> None:
        """One round: apply discovery (keeping the last groups if it fails), then probe every group."""
        try:
            self.apply(await self.discovery.fetch())
        except DiscoveryError as exc:
            log.warning("%s; keeping %d known group(s)", exc, len(self._members))
        await asyncio.gather(*(self._probe(name, m) for name, m in list(self._members.items())))

    # ---------------------------------------------------------------- discovery

    def apply(self, groups: Sequence[GroupInfo]) -> None:
        """Make the pool's groups these: new groups get a client; removed groups and groups replaced
        (new address or generation) lose theirs once their streams end, and start with fresh state."""
        wanted = {g.name: g for g in groups}
        stale = [n for n, m in self._members.items()
                 if n not in wanted or (m.info.address, m.info.generation) != (wanted[n].address, wanted[n].generation)]
        for name in stale:
            self._retire(name)
        if stale:  # a replaced group re-enters below as new: closed breaker, empty prefix table
            self.balancer.set_backends(self._specs())
        for g in groups:
            if g.name not in self._members:
                self._members[g.name] = _Member(g, self._client_factory(g.address))
                log.info("worker group %s (generation %d) at %s", g.name, g.generation, g.address)
            self._members[g.name].info = g
        self.balancer.set_backends(self._specs())
        for g in groups:
            if not g.healthy:
                self._set_health(g.name, False)

    def _specs(self) -> list[BackendSpec]:
        return [BackendSpec(n, m.info.address, m.client) for n, m in self._members.items()]

    def _retire(self, name: str) -> None:
        member = self._members.pop(name)
        backend = self.balancer.get(name)
        log.info("worker group %s (generation %d) at %s retired", name, member.info.generation, member.info.address)
        if self.metrics is not None:
            self.metrics.remove_group(name)
        task = asyncio.get_running_loop().create_task(self._close_when_idle(member.client, backend))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, client: Worker, backend: Backend | None) -> None:
        deadline = time.monotonic() + self.config.drain_s
        while backend is not None and backend.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await client.close()

    # ---------------------------------------------------------------- health and load

    async def _probe(self, name: str, member: _Member) -> None:
        timeout = self.config.probe_timeout_s
        try:
            healthy = await asyncio.wait_for(member.client.health(timeout=timeout), timeout * 2)
        except (asyncio.TimeoutError, WorkerError):
            healthy = False
        if self._members.get(name) is not member:
            return  # replaced while probing
        member.failed_probes = 0 if healthy else member.failed_probes + 1
        serving = member.failed_probes < self.config.failed_probes_unhealthy  # one slow probe is not death
        self._set_health(name, serving and member.info.healthy)
        self.balancer.on_probe(name, healthy)
        if not (serving and member.info.healthy):
            await self._unstick(name, member)
        if healthy:
            try:
                self.balancer.update_load(name, await member.client.get_load(timeout=timeout))
            except WorkerError as exc:
                log.debug("GetLoad of group %s failed: %s", name, exc)
        self._publish(name)

    async def _unstick(self, name: str, member: _Member) -> None:
        """An unhealthy group whose requests have received nothing for stall_timeout_s is hung: closing its
        client fails those requests, and they migrate (a draining group keeps streaming: its requests stay)."""
        backend = self.balancer.get(name)
        silent = time.monotonic() - member.last_response
        if backend is None or backend.in_flight == 0 or silent < self.config.stall_timeout_s:
            return
        log.warning("worker group %s is unhealthy and sent nothing for %.1fs: moving its %d request(s)",
                    name, silent, backend.in_flight)
        await member.client.close()

    def _set_health(self, name: str, healthy: bool) -> None:
        backend = self.balancer.get(name)
        if backend is not None and backend.healthy != healthy:
            log.warning("worker group %s is now %s", name, "healthy" if healthy else "unhealthy")
        self.balancer.set_health(name, healthy)
        self._publish(name)

    def _publish(self, name: str) -> None:
        backend = self.balancer.get(name)
        if self.metrics is not None and backend is not None:
            self.metrics.set_group_health(name, backend.healthy)
            self.metrics.set_circuit_state(name, backend.breaker.state)

    # ---------------------------------------------------------------- requests

    async def generate(self, params: GenerateParams) -> AsyncIterator[StreamItem]:
        """Admit, pick, stream; on a group's failure go on on another group (a retry before the first token,
        a migration after it) while the limits allow and a group is left.

        Raises APIError 429 (queue full), 503 (no group can take it) or 504 (its deadline passed), or
        WorkerError from the worker.
        """
        arrived = time.monotonic()
        async with self._admitted(params.deadline):
            await self.wait_discovered()
            progress = Progress(params)
            while True:
                backend = self._pick(progress)
                self._dispatched(backend, None if progress.failed else arrived)
                try:
                    async with contextlib.aclosing(self._attempt(backend, progress)) as attempt:
                        async for item in attempt:
                            yield item
                    return
                except _GroupFailed:
                    progress.failed_on(backend.name, self._generation(backend.name))

    def _pick(self, progress: Progress) -> Backend:
        """The group for the next attempt; APIError 504 past the deadline, 503 when no group is left."""
        deadline = progress.params.deadline
        if deadline is not None and time.monotonic() >= deadline:
            raise APIError(504, "the request did not finish before its deadline")
        generations = {name: m.info.generation for name, m in self._members.items()}
        backend = self.balancer.pick(progress.params.prompt_token_ids, exclude=progress.excluded(generations))
        if backend is None:
            raise self._unavailable(progress)
        return backend

    async def _attempt(self, backend: Backend, progress: Progress) -> AsyncIterator[StreamItem]:
        """One group's try; raises _GroupFailed when the group failed and another group may take over."""
        ok, member = True, self._members.get(backend.name)
        if member is not None:  # silence counts from the dispatch: a hang before the first token is one too
            member.last_response = time.monotonic()
        self.balancer.on_start(backend)
        try:
            async with contextlib.aclosing(backend.client.generate(progress.next_params())) as stream:
                async for item in stream:
                    if member is not None:
                        member.last_response = time.monotonic()
                    yield progress.record(item)
        except WorkerError as exc:
            ok = exc.status not in _GROUP_FAILURES
            self._count_cancel(exc.status)
            if ok or not progress.may_try_again(self.config):
                raise
            self._moving(backend.name, progress, exc)
            raise _GroupFailed() from exc
        finally:
            self.balancer.on_finish(backend, ok)
            self._publish(backend.name)

    def _moving(self, group: str, progress: Progress, exc: WorkerError) -> None:
        """Log and count a retry (nothing streamed yet) or a migration (tokens streamed)."""
        if progress.started:
            log.warning("request %s: group %s failed after %d tokens (%s); migrating", progress.params.request_id,
                        group, len(progress.output), exc.message)
        else:
            log.warning("request %s failed on group %s before its first token (%s); retrying",
                        progress.params.request_id, group, exc.message)
        if self.metrics is not None:
            (self.metrics.migration if progress.started else self.metrics.retry)(group)

    def _count_cancel(self, status: int) -> None:
        """The router's own cancellations: a client that did not read its stream (408), a deadline (504)."""
        reason = {408: "slow_client", 504: "deadline"}.get(status)
        if reason is not None and self.metrics is not None:
            self.metrics.cancelled(reason)

    def _generation(self, name: str) -> int:
        member = self._members.get(name)
        return member.info.generation if member is not None else -1

    @contextlib.asynccontextmanager
    async def _admitted(self, deadline: float | None) -> AsyncIterator[None]:
        if self.admission is None:
            yield
            return
        async with self.admission.slot(deadline):
            yield

    async def wait_discovered(self) -> None:
        """Return once the first refresh is done (at once when the pool was not started)."""
        if self._refreshed is not None and not self._refreshed.is_set():
            await self._wait_first_refresh()

    async def _wait_first_refresh(self) -> None:
        try:
            timeout = self.config.poll_interval_s + 2 * self.config.probe_timeout_s
            await asyncio.wait_for(self._refreshed.wait(), timeout)
        except asyncio.TimeoutError:
            pass  # answer with what is known (likely a 503)

    def _dispatched(self, backend: Backend, arrived: float | None) -> None:
        if self.metrics is None:
            return
        if arrived is not None:
            self.metrics.queue_time(time.monotonic() - arrived)
        self.metrics.dispatched(backend.name)

    def _unavailable(self, progress: Progress) -> APIError:
        if progress.failed:
            groups = ", ".join(name for name, _ in progress.failed)
            when = f"after {len(progress.output)} tokens " if progress.started else ""
            return APIError(503, f"the request failed on worker group(s) {groups} {when}and no other group "
                                 f"can take it; retry later")
        known = len(self._members)
        return APIError(503, f"no healthy worker group is available ({known} known); retry later")
