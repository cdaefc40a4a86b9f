"""Sampler tests: each parameter changes the distribution as specified; seeded draws are reproducible."""

import math

import pytest
import torch

from k2serve.worker.request import Request, SamplingParams
from k2serve.worker.sampler import Sampler

V = 32


def req(prompt=(1, 2), output=(), stop=(), **params):
    r = Request("r", list(prompt), SamplingParams(**params), stop_ids=frozenset(stop))
    r.token_ids.extend(output)
    return r


def logits_row(seed=0):
    return torch.randn(1, V, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(r, logits, n=150, sampler=None):
    sampler = sampler or Sampler(seed=1)
    return [sampler(logits.clone(), [r]).token_ids[0] for _ in range(n)]


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    lg = logits_row()
    best = int(lg.argmax())
    assert Sampler()(lg.clone(), [req(temperature=0)]).token_ids == [best]
    assert set(draw_many(req(temperature=1.5, top_k=1), lg, 50)) == {best}


def test_logit_bias_minus_100_bans_and_plus_100_forces():
    lg = logits_row()
    best = int(lg.argmax())
    assert Sampler()(lg.clone(), [req(temperature=0, logit_bias={best: -100.0})]).token_ids != [best]
    assert set(draw_many(req(temperature=1.0, logit_bias={5: 100.0}), lg, 50)) == {5}


def test_top_k_restricts_support():
    lg = logits_row()
    allowed = set(lg[0].topk(3).indices.tolist())
    assert set(draw_many(req(temperature=2.0, top_k=3), lg)) == allowed


def test_top_p_keeps_smallest_nucleus():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    assert set(draw_many(req(temperature=1.0, top_p=0.7), lg)) == {0, 1}
    assert set(draw_many(req(temperature=1.0, top_p=0.4), lg, 50)) == {0}


def test_min_p_drops_unlikely_tokens():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    assert set(draw_many(req(temperature=1.0, min_p=0.4), lg)) == {0, 1}


def test_temperature_sharpens_and_flattens():
    lg = logits_row(3)
    best = int(lg.argmax())
    cold = draw_many(req(temperature=0.1), lg)
    hot = draw_many(req(temperature=5.0), lg)
    assert cold.count(best) > hot.count(best) and len(set(hot)) > len(set(cold))


def test_sampling_matches_softmax_frequencies():
    lg = torch.log(torch.tensor([[0.6, 0.3, 0.1] + [0.0] * (V - 3)]).clamp_min(1e-30))
    draws = draw_many(req(temperature=1.0), lg, 1000)
    assert abs(draws.count(0) / 1000 - 0.6) < 0.06 and abs(draws.count(2) / 1000 - 0.1) < 0.04


def test_repetition_penalty_over_prompt_and_output():
    lg = torch.zeros(1, V)
    lg[0, 3], lg[0, 4], lg[0, 7] = 2.0, -1.0, 1.9
    r = req(prompt=(3, 4), temperature=0, repetition_penalty=2.0)
    logits = lg.clone()
    assert Sampler()(logits, [r]).token_ids == [7]
    assert logits[0, 3] == pytest.approx(1.0) and logits[0, 4] == pytest.approx(-2.0)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    lg = torch.zeros(1, V)
    lg[0, 3], lg[0, 5] = 1.0, 0.5
    r = req(prompt=(5,), output=(3, 3), temperature=0, frequency_penalty=0.3)
    logits = lg.clone()
    assert Sampler()(logits, [r]).token_ids == [5]
    assert logits[0, 3] == pytest.approx(1.0 - 0.6) and logits[0, 5] == pytest.approx(0.5)
    logits = lg.clone()
    Sampler()(logits, [req(prompt=(5,), output=(3, 3), temperature=0, presence_penalty=0.7)])
    assert logits[0, 3] == pytest.approx(0.3)


def test_min_tokens_bans_stop_ids_until_reached():
    lg = torch.zeros(1, V)
    lg[0, 9] = 10.0
    assert Sampler()(lg.clone(), [req(stop=(9,), temperature=0, min_tokens=2, output=(1,))]).token_ids != [9]
    assert Sampler()(lg.clone(), [req(stop=(9,), temperature=0, min_tokens=2, output=(1, 1))]).token_ids == [9]


def test_seeded_sampling_reproducible_and_batch_independent():
    lg = logits_row(5).repeat(3, 1)
    a = req(temperature=1.0, seed=42)
    alone = [Sampler(seed=s)(lg[:1].clone(), [a]).token_ids[0] for s in range(3)]
    batched = Sampler(seed=99)(lg.clone(), [req(temperature=1.0), a, req(temperature=1.0, seed=7)]).token_ids[1]
    assert len(set(alone)) == 1 and batched == alone[0]
    draws = []
    for step in range(20):  # the seed stream advances with the number of generated tokens
        r = req(temperature=1.0, seed=42, output=[0] * step)
        draws.append(Sampler()(lg[:1].clone(), [r]).token_ids[0])
    assert len(set(draws)) > 1


def test_logprobs_are_raw_model_logprobs_with_top_alternatives():
    lg = logits_row(2)
    raw = torch.log_softmax(lg, -1)[0]
    out = Sampler()(lg.clone(), [req(temperature=0.5, logprobs=True, top_logprobs=3, logit_bias={0: 5.0})])
    lp = out.logprobs[0]
    assert lp.logprob == pytest.approx(raw[lp.token_id].item())
    assert [t for t, _ in lp.top_logprobs] == raw.topk(3).indices.tolist()
    assert all(math.isclose(v, raw[t].item(), rel_tol=1e-5) for t, v in lp.top_logprobs)
    assert Sampler()(lg.clone(), [req(temperature=0)]).logprobs == [None]


def test_guided_mask_is_applied():
    lg = logits_row()

    def only_odd(logits):
        logits[:, 0::2] = -float("inf")

    tokens = [Sampler(seed=s)(lg.clone(), [req(temperature=1.0)], only_odd).token_ids[0] for s in range(30)]
    assert all(t % 2 == 1 for t in tokens)


def test_a_vanishing_temperature_samples_greedily():
    """logits / 1e-40 overflows float32 to inf and the softmax to NaN; below 1e-5 is greedy, as in vLLM."""
    assert SamplingParams(temperature=1e-40).is_greedy and not SamplingParams(temperature=1e-3).is_greedy
    lg = logits_row()
    best = int(lg[0].argmax())
    assert best != 0  # the token NaN probabilities used to give
    assert Sampler(seed=3)(lg.clone(), [req(temperature=1e-40)]).token_ids == [best]
