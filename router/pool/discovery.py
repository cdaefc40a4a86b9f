"""Discovery sources: where the router learns which worker groups exist.

A source is a `Discovery`: `fetch()` returns the current groups, `close()` releases what it holds.

* `StaticDiscovery`: a fixed list of (name, address), e.g. from the command line.
* `CallableDiscovery`: a function returning the groups, e.g. over the in-process controller's endpoints
  (run in a worker thread: it may block).
* `HttpDiscovery`: polls the controller's `GET /v1/groups` (routers in their own processes and pods).

The router never imports cluster/: the controller publishes its groups as JSON objects with the
GroupInfo field names (`name`, `address`, `healthy`, `generation`; other keys are ignored).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from k2serve.router.pool.security import ClientSecurity


@dataclass(frozen=True)
class GroupInfo:
    """One worker group as discovery reports it."""

    name: str
    address: str                 # rank 0's gRPC host:port
    healthy: bool = True         # the controller's view; the router also probes gRPC health itself
    generation: int = 0          # increments when the controller replaces the group


class DiscoveryError(Exception):
    """The discovery source could not be read (the router keeps its last known groups)."""


class Discovery(Protocol):
    """A source of the current worker groups; `fetch` raises DiscoveryError when it cannot be read."""

    async def fetch(self) -> list[GroupInfo]: ...

    async def close(self) -> None: ...


def group_info(entry: Any) -> GroupInfo:
    """A GroupInfo from one JSON object of the controller's `GET /v1/groups`."""
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("address"):
        raise DiscoveryError(f"a discovered group needs a name and an address, got {entry!r}")
    return GroupInfo(str(entry["name"]), str(entry["address"]), bool(entry.get("healthy", True)),
                     int(entry.get("generation") or 0))


class StaticDiscovery:
    """A fixed set of groups: `[(name, address), ...]`."""

    def __init__(self, groups: Iterable[tuple[str, str]]):
        self.groups = [GroupInfo(name, address) for name, address in groups]
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")

    async def fetch(self) -> list[GroupInfo]:
        return list(self.groups)

    async def close(self) -> None:
        return None


class CallableDiscovery:
    """Groups from a function, e.g. over the in-process controller's endpoints.

    The function runs in a worker thread, never in the event loop: it may block (the controller holds its
    lock while it stops a dead group, which can wait seconds on the dead rank), and every stream the router
    serves would stall with it. A call that has not answered within `timeout_s` is a DiscoveryError (the
    pool keeps its known groups); the next fetch waits for that same call rather than starting another.
    """

    def __init__(self, fn: Callable[[], Iterable[GroupInfo]], timeout_s: float = 2.0):
        self.fn = fn
        self.timeout_s = timeout_s
        self._call: asyncio.Future | None = None

    async def fetch(self) -> list[GroupInfo]:
        if self._call is None or self._call.done():
            self._call = asyncio.get_running_loop().run_in_executor(None, lambda: list(self.fn()))
        try:
            return await asyncio.wait_for(asyncio.shield(self._call), self.timeout_s)
        except asyncio.TimeoutError:
            raise DiscoveryError(f"the group source did not answer within {self.timeout_s}s") from None

    async def close(self) -> None:
        return None


class HttpDiscovery:
    """Groups from the controller's discovery endpoint: `GET {url}` -> `{"groups": [...]}`.

    `url` may be the server root (`http://controller:8001`); `/v1/groups` is appended then. With `security`
    (an https URL) the controller's certificate is verified and the token or client certificate presented.
    """

    def __init__(self, url: str, timeout_s: float = 2.0, security: ClientSecurity | None = None):
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1/groups") else url + "/v1/groups"
        self.timeout_s = timeout_s
        self.security = security
        self._client = None

    async def fetch(self) -> list[GroupInfo]:
        import httpx

        if self._client is None:
            secure = self.security is not None
            self._client = httpx.AsyncClient(timeout=self.timeout_s,
                                             verify=self.security.ssl_context() if secure else True,
                                             headers=self.security.http_headers() if secure else None)
        try:
            extensions = self.security.http_extensions() if self.security is not None else None
            resp = await self._client.get(self.url, extensions=extensions)
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise DiscoveryError(f"cannot read worker groups from {self.url}: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("groups"), list):
            raise DiscoveryError(f"{self.url} answered {str(body)[:200]!r}, expected {{\"groups\": [...]}}")
        return [group_info(e) for e in body["groups"]]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
