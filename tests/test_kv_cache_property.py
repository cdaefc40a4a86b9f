"""Property test: random submit / abort / step (finish by stop or length) sequences through the Scheduler
and KVCacheManager never leak or double-free a block, end every request, and leave the cache free."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2serve.worker.config import EngineConfig
from k2serve.worker.kv_cache import KVCacheManager
from k2serve.worker.request import Request, RequestRejected, SamplingParams
from k2serve.worker.scheduler import Scheduler

STOP = 0
PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9, 9]]

submit = st.tuples(st.just("submit"), st.integers(0, len(PREFIXES) - 1), st.integers(1, 14), st.integers(1, 10))
abort = st.tuples(st.just("abort"), st.integers(0, 40))
step = st.tuples(st.just("step"), st.booleans())
operations = st.lists(st.one_of(submit, abort, step, step), min_size=1, max_size=60)


def check_consistent(sched: Scheduler) -> None:
    kv = sched.kv_cache
    kv.check_invariants()
    for r in sched.running:
        assert len(kv.block_table(r.request_id)) * kv.block_size >= r.num_computed_tokens
    for r in sched.waiting:
        assert not kv.has_request(r.request_id), f"{r} waits while holding blocks"
    assert set(kv.tables) <= {r.request_id for r in sched.running}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, num_blocks=st.integers(6, 16), budget=st.integers(4, 24), prefix=st.booleans())
def test_random_operation_sequences_keep_the_cache_consistent(ops, num_blocks, budget, prefix):
    config = EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=budget, enable_prefix_caching=prefix)
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=prefix)
    sched = Scheduler(config, kv, max_model_len=64)
    submitted: list[Request] = []
    counter = 0
    for op in ops:
        if op[0] == "submit":
            _, p, n, max_tokens = op
            counter += 1
            r = Request(f"r{counter}", PREFIXES[p] + [10 + counter] * n,
                        SamplingParams(max_tokens=max_tokens), stop_ids=frozenset({STOP}))
            try:
                sched.add(r)
                submitted.append(r)
            except RequestRejected:
                pass
        elif op[0] == "abort" and submitted:
            sched.abort(submitted[op[1] % len(submitted)].request_id)
        elif op[0] == "step":
            plan = sched.schedule()
            sched.update(plan, {rid: (STOP if op[1] else 3) for rid in plan.sampling_request_ids})
        check_consistent(sched)
    for _ in range(500):
        if not sched.has_unfinished():
            break
        plan = sched.schedule()
        sched.update(plan, {rid: 3 for rid in plan.sampling_request_ids})
        check_consistent(sched)
    assert not sched.has_unfinished() and not sched.requests
    assert all(r.is_finished for r in submitted)
    assert kv.num_free_blocks == num_blocks and not kv.tables
