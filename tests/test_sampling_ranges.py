"""Every sampling number's usable range is checked in one place (worker/sampling_ranges.py): a value
outside it is a 400 from the worker (in-stream, over gRPC) and from the router (in the API's format)."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from k2serve.router.app import create_app
from k2serve.router.config import RouterConfig
from k2serve.router.pool.worker import Finished, GenerateParams, WorkerError
from k2serve.router.pool.worker_client import WorkerClient
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.text.tokenizer import K2Tokenizer
from k2serve.worker.request import RequestRejected, SamplingParams
from k2serve.worker.sampling_ranges import SAMPLING_RANGES, Range
from router_harness import ListPool, ServerThread, WorkerThread

TINY = 1.4e-45  # the smallest float32 above 0: what a "1e-45" becomes on the wire


@pytest.mark.parametrize("name,value", [
    ("repetition_penalty", TINY), ("repetition_penalty", 0.0), ("repetition_penalty", 1e39),
    ("repetition_penalty", math.nan), ("temperature", -1e-9), ("temperature", math.inf), ("top_p", 0.0),
    ("top_k", -2), ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -math.inf),
    ("max_tokens", 0), ("min_tokens", -1), ("seed", 2 ** 63)])
def test_every_sampling_number_outside_its_range_is_a_400(name, value):
    with pytest.raises(RequestRejected, match=name) as err:
        SamplingParams(**{name: value}).validate(vocab_size=100)
    assert err.value.status == 400 and str(SAMPLING_RANGES[name]) in err.value.message


def test_every_numeric_sampling_field_has_a_range():
    numeric = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "max_tokens", "min_tokens", "seed"}
    assert set(SAMPLING_RANGES) == numeric
    assert 1.0 in SAMPLING_RANGES["repetition_penalty"] and 0.01 in SAMPLING_RANGES["repetition_penalty"]
    assert True not in Range(0, 2) and 1 not in Range(1, 2, low_open=True) and str(Range(0, math.inf)) == "[0, inf)"


@pytest.fixture(scope="module")
def real_worker(tiny_model_dir):
    with WorkerThread(tiny_model_dir) as worker:
        yield worker


def test_the_worker_rejects_a_vanishing_repetition_penalty_in_stream(real_worker):
    async def scenario():
        client = WorkerClient(real_worker.address)
        try:
            with pytest.raises(WorkerError) as err:
                async for _ in client.generate(GenerateParams("tiny", (1, 2), max_tokens=4, repetition_penalty=TINY)):
                    pass
            ok = [item async for item in client.generate(GenerateParams("ok", (1, 2), max_tokens=2,
                                                                         repetition_penalty=1.3))]
            return err.value, ok
        finally:
            await client.close()
    err, ok = asyncio.run(scenario())
    assert err.status == 400 and "repetition_penalty" in err.message
    assert isinstance(ok[-1], Finished)


def test_the_router_answers_a_400_in_the_api_format(real_worker, tiny_model_dir):
    tokenizer = K2Tokenizer.from_dir(tiny_model_dir)
    pool = ListPool([WorkerClient(real_worker.address)])
    app = create_app(RouterConfig(model_name="kimi-k2-tiny"), pool, tokenizer, ChatTemplate.from_dir(tiny_model_dir))
    body = {"model": "kimi-k2-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "repetition_penalty": 1e-45}
    with ServerThread(app) as server:
        for stream in (False, True):
            r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 400, r.text
            assert "repetition_penalty" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "repetition_penalty": 1.2}, timeout=30)
        assert r.status_code == 200 and "\x00" not in r.json()["choices"][0]["message"]["content"]
