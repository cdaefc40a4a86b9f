"""Scheduler unit tests with plain Request factories and no model."""

import pickle

import pytest

from k2serve.worker.config import EngineConfig
from k2serve.worker.kv_cache import KVCacheManager
from k2serve.worker.request import Request, RequestRejected, RequestStatus, SamplingParams
from k2serve.worker.scheduler import Scheduler, StepPlan


def make_scheduler(num_blocks=64, block_size=4, max_model_len=256, **cfg):
    config = EngineConfig(block_size=block_size, **cfg)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=config.enable_prefix_caching)
    return Scheduler(config, kv, max_model_len)


def make_requests(n, prompt_len=6, max_tokens=4, start=0, shared_prefix=()):
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [Request(f"r{start + i}", list(shared_prefix) + [100 + 10 * (start + i) + j for j in range(prompt_len)],
                    params, stop_ids=frozenset({1})) for i in range(n)]


def run_step(sched: Scheduler, token: int = 7) -> tuple[StepPlan, list[Request]]:
    """Schedule one step and pretend the model sampled `token` for every sampling sequence."""
    plan = sched.schedule()
    sampled = {rid: token for rid in plan.sampling_request_ids}
    return plan, sched.update(plan, sampled)


def test_prefill_then_decode_and_finish_by_length():
    sched = make_scheduler()
    (req,) = make_requests(1, prompt_len=6, max_tokens=3)
    sched.add(req)
    plan, _ = run_step(sched)
    assert plan.token_ids == [req.token_ids[:6]] and plan.context_lens == [0] and plan.sample == [True]
    plan, _ = run_step(sched)
    assert plan.token_ids == [[7]] and plan.context_lens == [6]
    _, finished = run_step(sched)
    assert finished == [req] and req.status is RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == [7, 7, 7]
    assert not sched.has_unfinished() and sched.kv_cache.num_free_blocks == 64


def test_stop_token_finishes_with_stop_reason():
    sched = make_scheduler()
    (req,) = make_requests(1)
    sched.add(req)
    _, finished = run_step(sched, token=1)
    assert finished == [req] and req.status is RequestStatus.FINISHED_STOPPED and req.stop_token_id == 1


def test_min_tokens_delays_stop():
    sched = make_scheduler()
    req = Request("m", [5, 6, 7], SamplingParams(max_tokens=5, min_tokens=2), stop_ids=frozenset({1}))
    sched.add(req)
    run_step(sched, token=1)
    run_step(sched, token=1)
    assert not req.is_finished
    run_step(sched, token=1)
    assert req.status is RequestStatus.FINISHED_STOPPED


def test_long_prompt_is_chunked_under_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    (req,) = make_requests(1, prompt_len=20)
    sched.add(req)
    lens = []
    for _ in range(3):
        plan, _ = run_step(sched)
        lens.append((len(plan.token_ids[0]), plan.context_lens[0], plan.sample[0]))
    assert lens == [(8, 0, False), (8, 8, False), (4, 16, True)]
    assert req.output_token_ids == [7]


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = make_scheduler(max_num_batched_tokens=10)
    a, b = make_requests(2, prompt_len=4)
    sched.add(a)
    run_step(sched)  # a prefilled, now decoding
    sched.add(b)
    (c,) = make_requests(1, prompt_len=30, start=5)
    sched.add(c)
    plan, _ = run_step(sched)
    assert plan.request_ids[0] == "r0" and plan.token_ids[0] == [7]
    assert plan.num_tokens <= 10


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    for r in make_requests(3):
        sched.add(r)
    plan, _ = run_step(sched)
    assert plan.num_seqs == 2 and len(sched.waiting) == 1


def test_prefix_cache_hit_skips_compute_but_recomputes_last_token():
    sched = make_scheduler()
    prefix = list(range(200, 212))  # 3 full blocks of 4
    (a,) = make_requests(1, prompt_len=2, shared_prefix=prefix)
    sched.add(a)
    run_step(sched)
    (b,) = make_requests(1, prompt_len=2, start=1, shared_prefix=prefix)
    sched.add(b)
    plan, _ = run_step(sched)
    i = plan.request_ids.index("r1")
    assert plan.context_lens[i] == 12 and len(plan.token_ids[i]) == 2
    assert b.num_cached_tokens == 12
    assert plan.block_tables[i][:3] == sched.kv_cache.block_table("r0")[:3]
    # a prompt that is exactly 3 cached blocks still recomputes its last token
    c = Request("c", list(prefix), SamplingParams(max_tokens=2))
    sched.add(c)
    plan, _ = run_step(sched)
    assert plan.token_ids[plan.request_ids.index("c")] == prefix[8:] and c.num_cached_tokens == 8


def test_preemption_frees_newest_and_recomputes_everything_later():
    sched = make_scheduler(num_blocks=6, block_size=4, max_model_len=24, enable_prefix_caching=False)
    a, b = make_requests(2, prompt_len=7, max_tokens=9)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each (8 slots), 2 free
    for _ in range(7):
        run_step(sched)
    assert sched.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0
    while sched.has_unfinished():
        run_step(sched)
    assert a.output_token_ids == [7] * 9 and b.output_token_ids == [7] * 9
    assert sched.kv_cache.num_free_blocks == 6
    sched.kv_cache.check_invariants()


def test_preempted_request_prefills_prompt_and_outputs():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, enable_prefix_caching=False)
    a, b = make_requests(2, prompt_len=4, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)  # a needs a 2nd block; b gets one too
    plan, _ = run_step(sched)
    while b.num_preemptions == 0:
        plan, _ = run_step(sched)
    while "r1" not in plan.request_ids or plan.context_lens[plan.request_ids.index("r1")] != 0:
        plan, _ = run_step(sched)
    i = plan.request_ids.index("r1")
    assert plan.token_ids[i] == b.token_ids[:len(plan.token_ids[i])] and len(plan.token_ids[i]) > 4


def test_abort_frees_blocks_at_once():
    sched = make_scheduler()
    a, b = make_requests(2)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    used = sched.kv_cache.num_free_blocks
    assert sched.abort("r0") is a and a.status is RequestStatus.FINISHED_ABORTED
    assert sched.kv_cache.num_free_blocks == used + 2
    assert sched.abort("r0") is None and sched.abort("nope") is None
    plan, _ = run_step(sched)
    assert plan.request_ids == ["r1"]


def test_abort_waiting_request():
    sched = make_scheduler()
    (a,) = make_requests(1)
    sched.add(a)
    sched.abort("r0")
    assert not sched.has_unfinished() and sched.schedule().is_empty


def test_too_long_requests_are_rejected_with_clear_errors():
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(RequestRejected, match="exceeds the context length of 16") as e:
        sched.add(make_requests(1, prompt_len=10, max_tokens=7)[0])
    assert e.value.status == 400
    with pytest.raises(RequestRejected, match="leaves no room"):
        sched.add(make_requests(1, prompt_len=16, max_tokens=1)[0])
    small = make_scheduler(num_blocks=2, max_model_len=64)
    with pytest.raises(RequestRejected, match="needs more KV cache than this worker has in all"):
        small.add(make_requests(1, prompt_len=6, max_tokens=4)[0])
    unset = Request("u", [1] * 5, SamplingParams(max_tokens=None))
    small.add(unset)  # no max_tokens: capped to what the cache holds
    assert unset.max_new_tokens == 3


def test_queue_full_and_duplicate_id_rejected():
    sched = make_scheduler(max_num_waiting=1)
    a, b = make_requests(2)
    sched.add(a)
    with pytest.raises(RequestRejected, match="queue full") as e:
        sched.add(b)
    assert e.value.status == 429
    with pytest.raises(RequestRejected, match="already in use"):
        sched.add(make_requests(1)[0])


def test_unset_max_tokens_runs_to_context_end():
    sched = make_scheduler(max_model_len=10)
    req = Request("x", [5] * 6, SamplingParams(max_tokens=None))
    sched.add(req)
    while sched.has_unfinished():
        run_step(sched)
    assert req.num_output_tokens == 4 and req.status is RequestStatus.FINISHED_LENGTH


def test_step_plan_is_picklable_plain_data():
    sched = make_scheduler()
    for r in make_requests(2):
        sched.add(r)
    plan = sched.schedule()
    assert pickle.loads(pickle.dumps(plan)) == plan
