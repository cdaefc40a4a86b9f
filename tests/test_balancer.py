"""Balancer policies, health (ejection, circuit breaker) and admission control, with a fake clock."""

import asyncio
from dataclasses import dataclass

import pytest

from k2serve.router.pool.admission import AdmissionControl, Overloaded
from k2serve.router.pool.balancer import (
    POLICIES,
    Balancer,
    BalancerConfig,
    BackendSpec,
    BreakerState,
    CacheAwarePolicy,
    CircuitBreaker,
    PrefixTable,
    prefix_block_hashes,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Load:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


def make_balancer(policy="least_load", names=("g0", "g1", "g2"), **overrides):
    clock = FakeClock()
    balancer = Balancer(BalancerConfig(policy=policy, **overrides), clock=clock)
    balancer.set_backends(names)
    return balancer, clock


def prompt(prefix: int, n_blocks: int = 4, tail: int = 0) -> list[int]:
    """A prompt whose n_blocks 64-token blocks are determined by `prefix`, plus a unique tail."""
    return [prefix * 1000 + i for i in range(64 * n_blocks)] + [7] * tail


def send(balancer, ids, exclude=()):
    backend = balancer.pick(ids, exclude)
    balancer.on_start(backend)
    return backend


def test_round_robin_cycles_and_skips_excluded_and_unhealthy():
    balancer, _ = make_balancer("round_robin")
    assert [balancer.pick([1]).name for _ in range(5)] == ["g0", "g1", "g2", "g0", "g1"]
    assert balancer.pick([1], exclude=["g0"]).name == "g2"
    balancer.set_health("g1", False)
    assert [balancer.pick([1]).name for _ in range(3)] == ["g0", "g2", "g0"]
    balancer.set_backends(["g0", "g1", "g2", "g3"])
    assert [balancer.pick([1]).name for _ in range(3)] == ["g2", "g3", "g0"]


def test_least_load_counts_in_flight_and_reports():
    balancer, clock = make_balancer()
    a = send(balancer, [1])
    b = send(balancer, [1])
    assert {a.name, b.name} == {"g0", "g1"}
    assert balancer.pick([1]).name == "g2"
    balancer.update_load("g2", Load(num_running=3, num_waiting=2))
    assert balancer.pick([1]).name == "g0"
    balancer.update_load("g0", Load(kv_cache_usage=1.0))  # a full cache weighs like 8 requests
    assert balancer.pick([1]).name == "g1"
    balancer.on_finish(a, ok=True)
    balancer.on_finish(b, ok=True)
    clock.now += 11  # reports older than load_report_ttl_s no longer count
    assert balancer.load_score(balancer.get("g2")) == 0.0
    assert balancer.pick([1]).name == "g0"
    balancer.update_load("unknown", Load(num_running=1))  # a group discovery dropped: ignored


def test_cache_aware_keeps_a_shared_prefix_on_one_group():
    balancer, _ = make_balancer("cache_aware")
    first = send(balancer, prompt(1, tail=5))
    for tail in range(1, 4):  # same prefix, different suffixes, while first's load grows
        assert send(balancer, prompt(1, tail=tail)).name == first.name
    other = send(balancer, prompt(2))
    assert other.name != first.name  # a new prefix goes to the least loaded group
    assert send(balancer, prompt(2, n_blocks=6)).name == other.name  # longer prompt, same prefix


def test_cache_aware_picks_the_longest_matching_prefix():
    balancer, _ = make_balancer("cache_aware")
    policy = CacheAwarePolicy(balancer.config, score=lambda b: b.in_flight)
    g0, g1, g2 = balancer.backends
    short, long = prompt(3, n_blocks=1), prompt(3, n_blocks=5)
    policy.table("g1").insert(prefix_block_hashes(short, 64, 256))
    policy.table("g2").insert(prefix_block_hashes(long, 64, 256))
    balancer.on_start(g2)
    assert policy.choose([g0, g1, g2], long) is g2
    assert policy.choose([g0, g1, g2], short) is g1  # equal match: the lighter group


def test_cache_aware_spills_when_the_affine_group_is_overloaded():
    balancer, _ = make_balancer("cache_aware")
    home = send(balancer, prompt(1))
    balancer.update_load(home.name, Load(num_running=20))
    spilled = send(balancer, prompt(1))
    assert spilled.name != home.name  # 21 vs 0: beyond both thresholds
    balancer.update_load(home.name, Load(num_running=2))
    balancer.update_load(spilled.name, Load(num_running=5))
    assert balancer.pick(prompt(1)).name == home.name  # both hold the prefix: the lighter one
    balancer.update_load(spilled.name, Load(num_running=0))
    assert balancer.pick(prompt(1)).name == spilled.name
    balancer.update_load(home.name, Load(num_running=7))
    balancer.update_load(spilled.name, Load(num_running=7))
    assert balancer.pick(prompt(1)).name in {home.name, spilled.name}  # 8 vs 0 is still balanced


def test_cache_aware_short_prompts_fall_back_to_least_load():
    balancer, _ = make_balancer("cache_aware", names=("g0", "g1"))
    send(balancer, [5] * 63)  # no full block: no affinity
    assert balancer.pick([5] * 63).name == "g1"


def test_removed_group_loses_its_prefix_affinity():
    balancer, _ = make_balancer("cache_aware", names=("g0", "g1"))
    home = send(balancer, prompt(4))
    send(balancer, prompt(4))
    assert balancer.get(home.name).in_flight == 2  # affinity holds while balanced
    balancer.set_backends(["g0", "g1", "g9"])
    assert balancer.pick(prompt(4)).name == home.name  # surviving groups keep their tables
    balancer.set_backends(["g9"])
    balancer.set_backends([home.name, "g9"])
    readded = balancer.get(home.name)
    assert readded.in_flight == 0
    balancer.on_start(readded)
    assert balancer.pick(prompt(4)).name == "g9"  # its table is gone: least load decides


def test_set_backends_keeps_state_of_existing_groups():
    balancer, _ = make_balancer()
    g0 = send(balancer, [1])
    balancer.set_health("g1", False)
    client = object()
    balancer.set_backends([BackendSpec("g0", "10.0.0.1:50051", client), "g1", "g5"])
    assert [b.name for b in balancer.backends] == ["g0", "g1", "g5"]
    assert balancer.get("g0") is g0 and g0.in_flight == 1 and g0.address == "10.0.0.1:50051"
    assert g0.client is client
    assert balancer.get("g1").healthy is False and balancer.get("g2") is None


def test_consecutive_failures_eject_and_a_probe_readmits():
    balancer, clock = make_balancer(names=("g0", "g1"), failure_threshold=3, cooldown_s=10)
    g0 = balancer.get("g0")
    for _ in range(2):
        balancer.on_start(g0)
        balancer.on_finish(g0, ok=False)
    balancer.on_start(g0)
    balancer.on_finish(g0, ok=True)  # a success resets the count: failures must be consecutive
    for _ in range(3):
        balancer.on_start(g0)
        balancer.on_finish(g0, ok=False)
    assert g0.breaker.state is BreakerState.OPEN
    assert [balancer.pick([1]).name for _ in range(3)] == ["g1"] * 3
    clock.now += 10
    assert g0.breaker.state is BreakerState.HALF_OPEN
    probe = send(balancer, [1])
    assert probe is g0  # the idle re-admitted group gets the probe
    assert balancer.pick([1]).name == "g1"  # one probe at a time
    balancer.on_finish(g0, ok=True)
    assert g0.breaker.state is BreakerState.CLOSED and balancer.pick([1]).name == "g0"


def test_failed_probe_reopens_and_lost_probe_is_retried():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.can_accept()
    breaker.record_success()  # a request from before the opening: ignored
    assert breaker.state is BreakerState.OPEN
    clock.now += 5
    assert breaker.can_accept()
    breaker.on_start()
    assert not breaker.can_accept()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 5
    breaker.on_start()
    clock.now += 5  # the probe never answered
    assert breaker.state is BreakerState.HALF_OPEN and breaker.can_accept()


def test_out_of_band_probe_closes_the_breaker():
    balancer, clock = make_balancer(names=("g0",), failure_threshold=1, cooldown_s=1)
    g0 = balancer.get("g0")
    balancer.on_start(g0)
    balancer.on_finish(g0, ok=False)
    assert balancer.pick([1]) is None
    clock.now += 1
    balancer.on_probe("g0", ok=True)
    assert g0.breaker.state is BreakerState.CLOSED and balancer.pick([1]) is g0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_nothing_picked_when_no_group_can_take_it(policy):
    balancer, _ = make_balancer(policy)
    for name in ("g0", "g1", "g2"):
        balancer.set_health(name, False)
    assert balancer.pick(prompt(1)) is None
    balancer.set_health("g1", True)
    assert balancer.pick(prompt(1), exclude=["g1"]) is None
    assert balancer.pick(prompt(1)).name == "g1"
    assert Balancer(BalancerConfig(policy=policy)).pick([1]) is None


def test_config_validation_and_descriptions():
    with pytest.raises(ValueError, match="unknown balancing policy 'random'"):
        BalancerConfig(policy="random")
    with pytest.raises(ValueError, match=r"prefix_block_tokens\n.*greater than or equal to 1"):
        BalancerConfig(prefix_block_tokens=0)
    assert all(f.description for f in BalancerConfig.model_fields.values())


def test_prefix_hashes_are_chained_and_table_is_lru():
    a = prefix_block_hashes(prompt(1, n_blocks=3), 64, 256)
    b = prefix_block_hashes(prompt(2, n_blocks=1) + prompt(1, n_blocks=3)[64:], 64, 256)
    assert len(a) == 3 and a[0] != b[0] and a[1] != b[1]  # same block 1, different prefix
    assert len(prefix_block_hashes(prompt(1, n_blocks=3), 64, 2)) == 2
    table = PrefixTable(capacity=3)
    table.insert(a)
    assert table.match(a) == 3 and table.match(b) == 0
    table.insert([42])
    assert len(table) == 3 and table.match(a) == 0  # the oldest block was evicted


def run(coro):
    return asyncio.run(coro)


def test_admission_control_limits_concurrency_and_rejects_when_queue_full():
    async def scenario():
        admission = AdmissionControl(max_concurrency=2, max_queue=1)
        release = asyncio.Event()
        order = []

        async def request(i):
            async with admission.slot():
                order.append(i)
                await release.wait()

        tasks = [asyncio.create_task(request(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert admission.active == 2 and admission.queued == 1 and order == [0, 1]
        with pytest.raises(Overloaded) as info:
            async with admission.slot():
                pass
        assert info.value.status == 429 and "2 requests running and 1 queued" in info.value.message
        release.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and admission.active == 0 and admission.queued == 0

    run(scenario())


def test_admission_control_cancelled_waiter_leaks_no_slot():
    async def scenario():
        admission = AdmissionControl(max_concurrency=1, max_queue=2)
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        holder = asyncio.create_task(hold())
        waiter = asyncio.create_task(hold())
        await asyncio.sleep(0)
        assert admission.queued == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.queued == 0
        release.set()
        await holder
        assert admission.active == 0
        async with admission.slot():
            assert admission.active == 1

    run(scenario())


def test_admission_control_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_concurrency >= 1"):
        AdmissionControl(0, 1)
