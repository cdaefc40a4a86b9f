"""Engine tests: a fake model whose logits are a function of the cached context (fast, exact), then the
real tiny K2 checkpoint (batch invariance, prefix caching, preemption), then the AsyncEngine."""

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.model_runner import ModelRunner
from k2serve.worker.request import RequestRejected, SamplingParams
from k2serve.worker.vocab import Vocab

V = 64
STOP = 63


@dataclass(frozen=True)
class FakeConfig:
    vocab_size: int = V
    num_hidden_layers: int = 1
    kv_cache_dim: int = 2
    max_position_embeddings: int = 512


class FakeModel(torch.nn.Module):
    """Writes (token, position + 1) into the cache; the next token is a hash of the whole cached context.

    It asserts that every context slot holds the right position, so a wrong slot mapping, block table
    or prefix-cache hit fails loudly instead of silently changing the output.
    """

    config = FakeConfig()

    def forward(self, input_ids, positions, attn, kv_caches):
        flat = kv_caches[0].view(-1, 2)  # [num_blocks * block_size, 2]
        flat[attn.slot_mapping, 0] = input_ids.double()
        flat[attn.slot_mapping, 1] = positions.double() + 1
        hidden = []
        for i in range(attn.num_seqs):
            ctx = flat[attn.cache_slots(i)]  # [seq_len, 2]
            n = ctx.shape[0]
            assert torch.equal(ctx[:, 1], torch.arange(1, n + 1, dtype=ctx.dtype)), "cache layout broken"
            prefix = torch.cumsum(ctx[:, 0] * torch.arange(1, n + 1, dtype=ctx.dtype), 0)  # [seq_len]
            hidden.append(prefix[attn.context_lens[i]:])
        return torch.cat(hidden).unsqueeze(1)  # [T, 1]

    def compute_logits(self, hidden):
        h = hidden[:, 0].remainder(V - 1)  # [N] never the stop id by itself
        return -0.25 * (torch.arange(V, dtype=torch.float64) - h.unsqueeze(1)).abs().float()  # [N, V]


def fake_reference(prompt, n):
    """What the fake model generates greedily for `prompt`, computed directly."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(sum(t * (k + 1) for k, t in enumerate(tokens)) % (V - 1))
    return tokens[len(prompt):]


def fake_vocab():
    return Vocab(tuple(bytes([97 + i % 26]) for i in range(V)), {"[EOS]": STOP}, frozenset({STOP}), (STOP,))


def make_fake_engine(num_blocks=256, block_size=4, **cfg):
    config = EngineConfig(block_size=block_size, **cfg)
    runner = ModelRunner(FakeModel(), num_blocks, block_size, kv_caches=[torch.zeros(num_blocks, block_size, 2, dtype=torch.float64)])
    return Engine(config, runner, fake_vocab())


def prompts(n, seed=0, lo=3, hi=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 1, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


GREEDY8 = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_forward_batch_slots_positions_and_sample_rows():
    from k2serve.worker.model.attention_metadata import AttentionMetadata
    from k2serve.worker.model_runner import build_forward_batch
    from k2serve.worker.scheduler import StepPlan

    plan = StepPlan(["a", "b", "c"], [[5, 6, 7], [8], [9, 10]], [0, 6, 4], [[3, 1], [2, 0], [7, 4]],
                    [True, True, False], block_size=4)
    batch = build_forward_batch(plan)
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert batch.positions.tolist() == [0, 1, 2, 6, 4, 5]
    assert batch.attn.slot_mapping.tolist() == [12, 13, 14, 2, 16, 17]
    assert batch.sample_rows.tolist() == [2, 3]
    plain = AttentionMetadata(batch.attn.slot_mapping, batch.attn.query_start_loc, plan.context_lens, plan.block_tables, 4)
    for i in range(3):
        assert torch.equal(batch.attn.cache_slots(i), plain.cache_slots(i))


def test_fake_engine_batched_matches_reference():
    engine = make_fake_engine()
    ps = prompts(16)
    assert engine.generate(ps, GREEDY8) == [fake_reference(p, 8) for p in ps]
    assert engine.scheduler.kv_cache.num_free_blocks == 256


def test_fake_engine_chunked_prefill_and_preemption_keep_outputs():
    engine = make_fake_engine(num_blocks=24, max_num_batched_tokens=16, enable_prefix_caching=False)
    ps = prompts(12, seed=1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert engine.generate(ps, params) == [fake_reference(p, 20) for p in ps]
    assert engine.get_load().num_preemptions > 0
    engine.scheduler.kv_cache.check_invariants()


def test_fake_engine_prefix_cache_hit_reported_and_output_identical():
    engine = make_fake_engine()
    shared = list(range(1, 41))
    engine.generate([shared + [5]], GREEDY8)
    engine.add_request("b", shared + [7, 9], GREEDY8)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[0].cached_tokens == 40 and outs[-1].finished
    assert [t for o in outs for t in o.new_token_ids] == fake_reference(shared + [7, 9], 8)
    assert engine.get_load().prefix_cache_hit_rate > 0.4


def test_stop_id_ends_request_and_is_reported():
    engine = make_fake_engine()
    p = [1, 2, 3]
    first = fake_reference(p, 1)[0]
    engine.add_request("s", p, SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(first,)))
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "stop" and out.stop_token_id == first and out.new_token_ids == [first]


def test_abort_frees_blocks_at_once_and_reports_abort():
    engine = make_fake_engine()
    engine.add_request("a", list(range(20)), GREEDY8)
    engine.step()
    assert engine.scheduler.kv_cache.num_free_blocks < 256
    assert engine.abort_request("a")
    assert engine.scheduler.kv_cache.num_free_blocks == 256
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    assert not engine.abort_request("a") and not engine.has_unfinished()


def test_invalid_and_too_long_requests_rejected_with_clear_errors():
    engine = make_fake_engine(max_model_len=32)
    with pytest.raises(RequestRejected, match="exceeds the context length of 32") as e:
        engine.add_request("x", [1] * 30, SamplingParams(max_tokens=8))
    assert e.value.status == 400
    with pytest.raises(RequestRejected, match="temperature"):
        engine.add_request("y", [1], SamplingParams(temperature=-1))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        engine.add_request("z", [V + 3], SamplingParams())
    with pytest.raises(RequestRejected, match="logit_bias"):
        engine.add_request("w", [1], SamplingParams(logit_bias={V: 1.0}))


def test_default_stop_ids_and_ignore_eos():
    engine = make_fake_engine()
    bias = {STOP: 100.0}
    a = engine.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=4, logit_bias=bias))
    b = engine.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=4, logit_bias=bias, ignore_eos=True))
    assert a == [[STOP]] and b == [[STOP] * 4]


def test_logprobs_streamed_per_token():
    engine = make_fake_engine()
    engine.add_request("l", [4, 5], SamplingParams(temperature=0, max_tokens=3, logprobs=True, top_logprobs=2))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert [lp.token_id for lp in lps] == fake_reference([4, 5], 3)
    assert all(lp.top_logprobs[0][0] == lp.token_id and len(lp.top_logprobs) == 2 for lp in lps)


def test_seeded_sampling_reproducible_and_independent_of_the_batch():
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    alone = make_fake_engine().generate([[1, 2, 3]], seeded)
    others = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batched = make_fake_engine().generate([[4, 5], [1, 2, 3], [6]], [others, seeded, others])
    assert batched[1] == alone[0]
    other_seed = make_fake_engine().generate([[1, 2, 3]], SamplingParams(temperature=1.0, seed=12, max_tokens=12, ignore_eos=True))
    assert other_seed != alone


def test_fail_all_ends_every_request_with_error():
    engine = make_fake_engine()
    engine.add_request("a", [1, 2], GREEDY8)
    engine.add_request("b", [3], GREEDY8)
    outs = engine.fail_all("boom")
    assert {o.request_id for o in outs} == {"a", "b"} and all(o.finish_reason == "error" and o.error == "boom" for o in outs)
    assert engine.scheduler.kv_cache.num_free_blocks == 256


# ---------------------------------------------------------------- AsyncEngine

from k2serve.worker.async_engine import AsyncEngine  # noqa: E402


async def _collect(agen):
    return [o async for o in agen]


def _run_then_idle(aengine, engine, main) -> None:
    """Run `main()`, then check that the engine kept no request and no block; always stop the thread."""
    try:
        asyncio.run(main())
        assert engine.scheduler.kv_cache.num_free_blocks == 256 and not engine.scheduler.requests
    finally:
        aengine.shutdown()


async def _until_idle(engine, timeout_s: float = 1.0) -> None:
    """Wait (bounded) for the engine thread to free every block; the caller asserts the end state."""
    for _ in range(int(timeout_s / 0.01)):
        if engine.scheduler.kv_cache.num_free_blocks == 256 and not engine.scheduler.requests:
            return
        await asyncio.sleep(0.01)


def test_async_engine_streams_concurrent_requests_and_rejects_early():
    aengine = AsyncEngine(make_fake_engine())

    async def main():
        ps = prompts(6, seed=3)
        results = await asyncio.gather(*[_collect(aengine.generate(f"q{i}", p, GREEDY8)) for i, p in enumerate(ps)])
        for p, outs in zip(ps, results):
            assert [t for o in outs for t in o.new_token_ids] == fake_reference(p, 8)
            assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 8
        with pytest.raises(RequestRejected, match="top_p"):
            async for _ in aengine.generate("bad", [1], SamplingParams(top_p=0)):
                pass

    try:
        asyncio.run(main())
        assert aengine.get_load().num_running == 0
    finally:
        aengine.shutdown()


def test_async_engine_load_already_counts_the_requests_whose_outputs_a_consumer_has():
    """A consumer that has a request's first output reads a load that counts it, however long the engine
    thread takes after handing the outputs over (here it stalls in its next call)."""
    engine = make_fake_engine()
    aengine = AsyncEngine(engine)
    plain, stalled = engine.has_unfinished, threading.Event()

    def slow_has_unfinished():
        if stalled.is_set():
            time.sleep(0.3)  # the engine thread, just after a step's outputs went to the consumers
        return plain()
    engine.has_unfinished = slow_has_unfinished

    async def main():
        stream = aengine.generate("seen", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        stalled.set()
        await stream.__anext__()
        assert aengine.get_load().num_running == 1
        stalled.clear()
        await stream.aclose()
        await _until_idle(engine)

    _run_then_idle(aengine, engine, main)


def test_async_engine_wakes_the_loop_once_per_step_not_once_per_output():
    from k2serve.worker import async_engine

    aengine = AsyncEngine(make_fake_engine())
    wakes = []

    async def main():
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counting(callback, *args):
            if callback is async_engine._deliver:
                wakes.append(len(args[0]))
            return plain(callback, *args)

        loop.call_soon_threadsafe = counting
        ps = prompts(6, seed=4)
        return await asyncio.gather(*[_collect(aengine.generate(f"w{i}", p, GREEDY8)) for i, p in enumerate(ps)])

    try:
        results = asyncio.run(main())
    finally:
        aengine.shutdown()
    assert sum(wakes) == 6 * 8  # every step's output delivered (a slow consumer may take two merged)
    assert sum(len(o.new_token_ids) for outs in results for o in outs) == 6 * 8
    assert max(wakes) == 6 and len(wakes) <= 8 + 2, wakes  # a step's six outputs share one wake-up


def test_async_engine_merges_outputs_a_slow_consumer_has_not_taken():
    aengine = AsyncEngine(make_fake_engine())

    async def main():
        p = prompts(1, seed=5)[0]
        outs = []
        async for out in aengine.generate("slow", p, GREEDY8):
            outs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead while this consumer sleeps
        assert [t for o in outs for t in o.new_token_ids] == fake_reference(p, 8)
        assert len(outs) < 8, "queued outputs arrive merged, not one message per token"
        assert outs[-1].finished and outs[-1].completion_tokens == 8

    try:
        asyncio.run(main())
    finally:
        aengine.shutdown()


def test_async_engine_abort_on_consumer_exit_and_by_id():
    engine = make_fake_engine()
    aengine = AsyncEngine(engine)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        async for _ in aengine.generate("c", [1, 2, 3], long):
            break  # consumer leaves: the request is aborted
        outs = []

        async def consume():
            async for o in aengine.generate("d", [4, 5], long):
                outs.append(o)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        assert aengine.abort("d")
        await asyncio.wait_for(task, 5)
        assert outs[-1].finish_reason == "abort"
        await _until_idle(engine)

    _run_then_idle(aengine, engine, main)


def test_async_engine_an_id_is_taken_until_its_last_output_is_delivered():
    engine = make_fake_engine()
    aengine = AsyncEngine(engine)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        for attempt in range(10):
            leaving = aengine.generate(f"x{attempt}", [1, 2, 3], long)
            await leaving.__anext__()
            await leaving.aclose()  # its abort is on its way to the engine thread
            try:
                outs = await asyncio.wait_for(_collect(aengine.generate(f"x{attempt}", [4, 5], GREEDY8)), 5)
            except RequestRejected as exc:
                assert "already in use" in str(exc)
                continue
            # accepted: it must be a whole request of its own, never ended by the old one's abort
            assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 8, attempt
            assert outs[-1].prompt_tokens == 2
        await _until_idle(engine)

    _run_then_idle(aengine, engine, main)


def test_async_engine_step_failure_ends_requests_with_error():
    engine = make_fake_engine()

    def broken(plan):
        raise RuntimeError("device on fire")

    engine.runner.execute = broken
    aengine = AsyncEngine(engine)

    async def main():
        return await asyncio.wait_for(_collect(aengine.generate("e", [1, 2], GREEDY8)), 5)

    try:
        outs = asyncio.run(main())
        assert outs[-1].finish_reason == "error" and "device on fire" in outs[-1].error
    finally:
        aengine.shutdown()

    async def after_shutdown():
        async for _ in aengine.generate("f", [1], GREEDY8):
            pass

    with pytest.raises(RequestRejected, match="shutting down") as e:
        asyncio.run(after_shutdown())
    assert e.value.status == 503


# ---------------------------------------------------------------- the real tiny K2 checkpoint

from k2serve.worker.loader import load_model  # noqa: E402

REAL_GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, vocab) of the session's tiny K2 checkpoint, loaded once; engines share the weights, not the cache."""
    model_dir = tiny_model_dir
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    return model, Vocab.from_model_dir(model_dir, model.config.vocab_size)


def real_engine(tiny, num_blocks=256, **cfg):
    model, vocab = tiny
    config = EngineConfig(max_model_len=256, **cfg)
    return Engine(config, ModelRunner(model, num_blocks, config.block_size), vocab)


@pytest.fixture(scope="module")
def real_prompts():
    g = torch.Generator().manual_seed(7)
    lens = [3, 5, 8, 11, 13, 16, 17, 20, 23, 26, 29, 31, 33, 36, 38, 40]
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def alone(tiny, real_prompts):
    """Each prompt's greedy output when it runs by itself."""
    engine = real_engine(tiny, enable_prefix_caching=False)
    return [engine.generate([p], REAL_GREEDY)[0] for p in real_prompts]


def test_batch_invariance_16_requests_match_running_alone(tiny, real_prompts, alone):
    engine = real_engine(tiny)
    assert engine.generate(real_prompts, REAL_GREEDY) == alone
    assert len({tuple(a) for a in alone}) > 8  # the prompts really produce different outputs


def test_prefix_cache_reuses_blocks_and_keeps_output(tiny, real_prompts, alone):
    engine = real_engine(tiny, block_size=16)
    base = real_prompts[-1]  # 40 tokens: 2 full blocks of 16
    engine.generate([base], REAL_GREEDY)
    variant = base[:32] + [5, 6, 7]
    engine.add_request("v", variant, REAL_GREEDY)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[0].cached_tokens == 32 and outs[-1].cached_tokens == 32
    fresh = real_engine(tiny, enable_prefix_caching=False).generate([variant], REAL_GREEDY)[0]
    assert [t for o in outs for t in o.new_token_ids] == fresh
    assert engine.generate([base], REAL_GREEDY)[0] == alone[-1]  # a full hit still recomputes the last token


def test_preemption_and_chunked_prefill_under_a_small_cache_keep_output(tiny, real_prompts, alone):
    engine = real_engine(tiny, num_blocks=10, block_size=4, max_num_batched_tokens=12)
    picked = list(range(0, 8))  # prompts of 3..20 tokens: at most 6 blocks each, 10 blocks in all
    assert engine.generate([real_prompts[i] for i in picked], REAL_GREEDY) == [alone[i] for i in picked]
    assert engine.get_load().num_preemptions > 0
    assert engine.scheduler.kv_cache.num_free_blocks == 10


def test_the_context_length_is_what_the_kv_cache_can_hold():
    """A sequence can never outgrow the whole cache: the engine serves (and advertises) at most that, so a
    request without max_tokens (the router fills in the context length) is admitted, not refused."""
    engine = make_fake_engine(num_blocks=8, block_size=4, max_model_len=64)  # 32 tokens of cache
    assert engine.max_model_len == 32
    engine.add_request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=32 - 3, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 29
    assert make_fake_engine(num_blocks=64, block_size=4, max_model_len=64).max_model_len == 64


def test_a_slow_grammar_compiles_without_stalling_the_running_requests(tiny):
    """A grammar compiles off the engine thread (xgrammar releases the GIL), so a request already running
    keeps its pace while a guided one that takes a second to compile is admitted."""
    import json

    from k2serve.worker.guided import GuidedDecoding
    from k2serve.worker.request import GuidedSpec

    spec = GuidedSpec("json_schema", schema=json.dumps({"type": "string", "pattern": "[a-z]{1,3000}"}))
    model, vocab = tiny
    started = time.perf_counter()
    GuidedDecoding(vocab, model.config.vocab_size).compile(spec)  # its own cache: the engine compiles it again
    compile_s = time.perf_counter() - started

    async def run():
        aengine = AsyncEngine(real_engine(tiny))
        try:
            gaps, last = [], None

            async def plain():
                nonlocal last
                params = SamplingParams(temperature=0, max_tokens=250, ignore_eos=True)
                async for out in aengine.generate("plain", [1, 2, 3], params):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    if out.completion_tokens >= 5 and not guided_task:
                        guided_task.append(asyncio.create_task(guided()))
                    if guided_task and guided_task[0].done():
                        break

            async def guided():
                params = SamplingParams(temperature=0, max_tokens=2, guided=spec)
                return [out async for out in aengine.generate("guided", [1, 2, 3], params)]

            guided_task: list = []
            await plain()
            return max(gaps), await guided_task[0]
        finally:
            aengine.shutdown()

    max_gap, outs = asyncio.run(run())
    assert outs[-1].finished
    assert max_gap < compile_s / 2, (max_gap, compile_s)
