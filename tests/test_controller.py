"""Controller over fake groups (the `Group` protocol; WorkerGroup on Ray is tested in test_group_health.py):
asking for the groups never waits on a group being stopped, failed groups are replaced and draining
ones only unpublished, and a rolling restart drains and restarts one group at a time."""

from __future__ import annotations

import threading

import httpx
import pytest

from k2serve.cluster.config import ClusterConfig, ControllerSection, GroupSection
from k2serve.cluster.controller import Controller
from k2serve.cluster.group import GroupHealth
from k2serve.worker.health import DRAINING, FAILED, SERVING


class FakeGroup:  # a controller.Group
    """One incarnation; `stop` can be made to block (a graceful stop waiting on a dead rank)."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log
        self.address, self.pids, self.metrics_address = f"127.0.0.1:{len(log) + 1000}", [len(log)], None
        self.state = GroupHealth(SERVING)
        self.stopping, self.release = threading.Event(), threading.Event()
        self.release.set()
        log.append(("start", name))

    def health(self, timeout_s: float = 2.0) -> GroupHealth:
        return self.state

    def stop(self, grace_s: float | None = 1.0) -> None:
        self.log.append(("stop", self.name, grace_s))
        self.stopping.set()
        assert self.release.wait(30)


def make(n: int = 2, **controller) -> tuple[Controller, list, dict]:
    log, live = [], {}

    def launch(section: GroupSection) -> FakeGroup:
        live[section.name] = FakeGroup(section.name, log)
        return live[section.name]

    config = ClusterConfig(groups=[GroupSection(name=f"g{i}") for i in range(n)],
                           controller=ControllerSection(health_interval_s=3600, restart_pause_s=0, **controller))
    return Controller(config, "/nowhere", launch).start(), log, live


def in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_asking_for_the_groups_never_waits_on_a_group_being_stopped():
    """kill -9 of one rank: stopping that group waits on the dead rank; the other group and whoever asks
    for the groups (the router's discovery) must not wait with it."""
    controller, log, live = make()
    dead = live["g0"]
    dead.state = GroupHealth(FAILED, "a follower rank stopped following rank 0")
    dead.release.clear()
    checking = in_thread(lambda: controller.check(controller.groups[0]))
    assert dead.stopping.wait(10)
    answers = []
    asking = in_thread(lambda: answers.append(controller.endpoints()))
    asking.join(5)
    try:
        assert answers, "endpoints() waited for the dead group's stop"
        assert [(e.name, e.healthy) for e in answers[0]] == [("g1", True)]  # the failed group is unpublished
    finally:
        dead.release.set()
        checking.join(10)
        controller.stop()
    assert [(e.name, e.generation) for e in answers[0]] == [("g1", 1)]
    assert ("stop", "g0", None) in log and log.count(("start", "g0")) == 2  # stopped at once, then replaced


def test_a_draining_group_is_unpublished_but_kept_until_it_exits():
    controller, log, live = make(drain_timeout_s=5)
    try:
        live["g0"].state = GroupHealth(DRAINING, "the worker is draining")
        controller.check(controller.groups[0])
        assert {e.name: e.healthy for e in controller.endpoints()} == {"g0": False, "g1": True}
        assert log.count(("start", "g0")) == 1
        live["g0"].state = GroupHealth(FAILED, "a rank did not answer: ActorDiedError")  # it exited
        controller.check(controller.groups[0])
        assert {(e.name, e.generation, e.healthy) for e in controller.endpoints()} == {("g0", 2, True), ("g1", 1, True)}
    finally:
        controller.stop()


def test_a_failed_group_stays_published_unhealthy_when_replacing_is_off():
    controller, log, live = make(replace_dead_groups=False)
    try:
        live["g1"].state = GroupHealth(FAILED, "hung")
        controller.check(controller.groups[1])
        assert {e.name: e.healthy for e in controller.endpoints()} == {"g0": True, "g1": False}
        assert not any(entry[0] == "stop" for entry in log)
    finally:
        controller.stop()


def test_rolling_restart_drains_and_restarts_one_group_at_a_time():
    controller, log, live = make(n=3, drain_timeout_s=7)
    seen = []
    first = live["g0"]
    first.release.clear()  # hold g0's drain to look at what is published meanwhile
    restarting = in_thread(lambda: seen.append(controller.rolling_restart()))
    assert first.stopping.wait(10)
    try:
        assert {e.name for e in controller.endpoints()} == {"g1", "g2"}  # the others serve meanwhile
        with pytest.raises(RuntimeError, match="already running"):
            controller.rolling_restart()
    finally:
        first.release.set()
        restarting.join(10)
        controller.stop()
    assert seen == [{"g0": 2, "g1": 2, "g2": 2}]
    order = [entry[:2] for entry in log[3:9]]
    assert order == [("stop", "g0"), ("start", "g0"), ("stop", "g1"), ("start", "g1"), ("stop", "g2"), ("start", "g2")]
    assert all(entry[2] == 7 for entry in log[3:9] if entry[0] == "stop")  # drained for drain_timeout_s


def test_rolling_restart_rejects_an_unknown_group_before_stopping_anything():
    controller, log, _ = make()
    try:
        with pytest.raises(KeyError, match="nope"):
            controller.rolling_restart(["g0", "nope"])
        assert not any(entry[0] == "stop" for entry in log)
    finally:
        controller.stop()


def test_the_watcher_leaves_a_group_being_restarted_alone():
    controller, log, live = make()
    g0 = controller.groups[0]
    with g0.busy:  # as restart() holds it
        live["g0"].state = GroupHealth(FAILED, "stopping for a restart")
        controller.check(g0)
        assert log.count(("start", "g0")) == 1
    controller.stop()


def test_a_rolling_restart_through_the_discovery_port_and_k2serve_restart(capsys):
    from k2serve.cluster.cli import main
    from k2serve.cluster.discovery import discovery_app
    from router_harness import ServerThread, wait_until

    controller, log, live = make()
    try:
        with ServerThread(discovery_app(controller)) as server:
            assert httpx.post(server.url + "/v1/groups/restart", json={"groups": ["nope"]}).status_code == 404
            live["g1"].release.clear()  # hold the first restart to see the second refused
            r = httpx.post(server.url + "/v1/groups/restart", json={"groups": ["g1"], "grace_s": 3})
            assert r.status_code == 202 and r.json() == {"restarting": ["g1"]}
            assert httpx.post(server.url + "/v1/groups/restart", json={}).status_code == 409
            live["g1"].release.set()
            assert wait_until(lambda: not controller.is_restarting, 30)
            assert main(["restart", "--discovery", server.url, "--wait", "--timeout", "60"]) == 0
        gens = {e.name: e.generation for e in controller.endpoints()}
    finally:
        controller.stop()
    assert gens == {"g0": 2, "g1": 3}
    assert ("stop", "g1", 3) in log
    assert "restarting g0, g1 one at a time" in capsys.readouterr().err
