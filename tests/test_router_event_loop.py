"""Nothing in the router's event loop waits on the controller.

`k2serve serve`'s router learns its groups from the in-process controller, whose lock is held while it
stops a dead group (seconds, waiting on the dead rank). Discovery used to call it from the event loop:
every stream, /health and probe of the router froze meanwhile (~5 s when one follower rank of a group was
killed). Here the group source blocks like that lock; the loop must keep running and the pool keep its
known groups until the source answers again."""

from __future__ import annotations

import asyncio
import threading
import time

from k2serve.router.pool.balancer import Balancer, BalancerConfig
from k2serve.router.pool.discovery import CallableDiscovery, GroupInfo
from k2serve.router.pool.group_pool import GroupPool, GroupPoolConfig

from test_group_pool import FakeGroup


def test_a_blocked_group_source_does_not_stall_the_event_loop():
    lock = threading.Lock()  # the controller's lock
    groups = {"h:1": FakeGroup("h:1"), "h:2": FakeGroup("h:2")}
    listed = [GroupInfo("a", "h:1", True, 1)]

    def endpoints() -> list[GroupInfo]:  # Controller.endpoints: takes the lock
        with lock:
            return list(listed)

    async def main():
        discovery = CallableDiscovery(endpoints, timeout_s=0.2)
        pool = GroupPool(discovery, Balancer(BalancerConfig(policy="round_robin")),
                         config=GroupPoolConfig(poll_interval_s=0.05, probe_timeout_s=0.2),
                         client_factory=groups.__getitem__).start()
        await pool.wait_discovered()
        gaps, last = [], time.monotonic()
        lock.acquire()  # a group is being stopped for 1.5 s
        threading.Timer(1.5, lock.release).start()
        listed.append(GroupInfo("b", "h:2", True, 1))
        while time.monotonic() - last < 3.0 and len(gaps) < 400:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - before)
            if len(gaps) == 100:  # during the block: the known group still serves
                assert [g.name for g in pool.groups] == ["a"]
                assert [i async for i in pool.generate(params())][-1].finish_reason == "length"
        names = [g.name for g in pool.groups]
        await pool.close()
        return max(gaps), names

    def params():
        from k2serve.router.pool.worker import GenerateParams
        return GenerateParams("r", (1, 2), max_tokens=3)

    longest, names = asyncio.run(main())
    assert longest < 0.5, f"the event loop stalled for {longest:.2f}s"
    assert names == ["a", "b"]  # the source answered again: the new group is known
