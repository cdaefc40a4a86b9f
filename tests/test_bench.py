"""`k2serve bench` against a small in-test OpenAI-compatible server that streams known token counts
and fails some requests on purpose (request number % 7: 3 -> HTTP 500, 5 -> HTTP 429, 6 -> an error
chunk mid-stream). Chat streams 2 tokens per chunk and reports usage; completions stream 1 token per
chunk and never report usage (the chunk-count fallback). Prompts with SPLIT stream every event in two
network writes; BADJSON gets a stream whose only event is not JSON."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from k2serve.cluster import bench_cli
from k2serve.cluster.bench import BenchConfig, LengthDist, arrival_delays, load_prompts, make_requests, run_bench

CHUNK_DELAY_S = 0.001


def make_app() -> FastAPI:
    app = FastAPI()
    counter = itertools.count()
    client_ports: set[int] = set()

    @app.middleware("http")
    async def record_port(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            client_ports.add(request.client.port)
        return await call_next(request)

    @app.get("/client_ports")
    async def ports():
        return sorted(client_ports)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny-k2", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        prompt = " ".join(m["content"] for m in body["messages"])
        return await respond(body, prompt, next(counter), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        return await respond(body, body["prompt"], next(counter), chat=False)

    return app


async def respond(body: dict, prompt: str, n: int, chat: bool):
    if "SLOW" in prompt:
        await asyncio.sleep(2.0)
    if "BADJSON" in prompt:
        return StreamingResponse(iter(["data: {not json\n\n"]), media_type="text/event-stream")
    if n % 7 == 3:
        return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
    if n % 7 == 5:
        return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429)
    usage = chat and body.get("stream_options", {}).get("include_usage")
    events = stream_events(body["max_tokens"], len(prompt.split()), chat, usage, fail=n % 7 == 6)
    return StreamingResponse(split_writes(events) if "SPLIT" in prompt else events, media_type="text/event-stream")


async def split_writes(events):
    """Every event in two writes cut inside its JSON, so that the client has to join a line across reads."""
    async for event in events:
        half = len(event) // 2
        yield event[:half]
        await asyncio.sleep(CHUNK_DELAY_S)
        yield event[half:]


async def stream_events(max_tokens: int, prompt_tokens: int, chat: bool, usage: bool, fail: bool):
    per_chunk = 2 if chat else 1
    if chat:
        yield sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})  # no output: not the first token
    for i, start in enumerate(range(0, max_tokens, per_chunk)):
        await asyncio.sleep(CHUNK_DELAY_S)
        if fail and i == 2:
            yield sse({"error": {"message": "worker died", "code": 503}})
            return
        text = "tok " * min(per_chunk, max_tokens - start)
        yield sse({"choices": [{"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}]})
    yield sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    if usage:
        yield sse({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                                            "total_tokens": prompt_tokens + max_tokens}})
    yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture()
def base_url():
    """A fresh server per test, so every test sees the failure pattern from request 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


def _expected_failures(num_requests: int) -> dict[str, int]:
    kinds = {3: "http_500", 5: "http_429", 6: "stream_error"}
    out: dict[str, int] = {}
    for n in range(num_requests):
        if n % 7 in kinds:
            out[kinds[n % 7]] = out.get(kinds[n % 7], 0) + 1
    return out


def test_chat_metrics_are_present_and_consistent(base_url):
    cfg = BenchConfig(base_url=base_url, model="tiny-k2", num_requests=21, concurrency=4,
                      input_len=LengthDist(5, 10), output_len=LengthDist(6, 15), slo_ttft_s=10.0)
    summary, results = run_bench(cfg)
    specs = make_requests(cfg)
    assert summary["completed"] == 12 and summary["failed"] == 9
    assert summary["errors_by_kind"] == _expected_failures(21)
    ok = [(r, s) for r, s in zip(results, specs) if r.ok]
    for r, spec in ok:
        assert r.usage_reported and r.output_tokens == spec.max_tokens
        assert r.output_chunks == math.ceil(spec.max_tokens / 2)
        assert r.prompt_tokens == len(spec.prompt.split())
        assert 0 < r.ttft_s <= r.e2e_s
        assert len(r.itl_s) == r.output_chunks - 1
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (r.output_tokens - 1))
    assert summary["total_output_tokens"] == sum(s.max_tokens for _, s in ok)
    assert summary["usage_reported"] == 12
    for metric in ("ttft", "tpot", "itl", "e2e"):
        st = summary[metric]
        # events that arrive in one network read share a timestamp: gaps between tokens may be 0
        assert (0 < st["p50_ms"] if metric in ("ttft", "e2e") else 0 <= st["p50_ms"])
        assert st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"] <= st["max_ms"]
    assert summary["ttft"]["max_ms"] <= summary["e2e"]["max_ms"]
    assert summary["request_throughput"] == pytest.approx(12 / summary["duration_s"])
    assert summary["output_throughput"] == pytest.approx(summary["total_output_tokens"] / summary["duration_s"])
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])  # generous SLO: all good
    assert summary["goodput"] <= summary["request_throughput"]


def test_goodput_counts_only_requests_within_slo(base_url):
    cfg = BenchConfig(base_url=base_url, model="tiny-k2", num_requests=7, concurrency=7,
                      output_len=LengthDist(8, 8), slo_tpot_s=1e-7)
    summary, _ = run_bench(cfg)
    assert summary["completed"] == 4 and summary["goodput"] == 0.0 < summary["request_throughput"]


def test_completions_without_usage_count_chunks(base_url):
    cfg = BenchConfig(base_url=base_url, model="tiny-k2", endpoint="completions", num_requests=3,
                      concurrency=1, output_len=LengthDist(5, 9))
    summary, results = run_bench(cfg)
    assert summary["completed"] == 3 and summary["usage_reported"] == 0
    for r, spec in zip(results, make_requests(cfg)):
        assert not r.usage_reported and r.output_tokens == r.output_chunks == spec.max_tokens


def test_poisson_arrivals_spread_the_run(base_url):
    cfg = BenchConfig(base_url=base_url, model="tiny-k2", num_requests=3, concurrency=None,
                      request_rate=20.0, output_len=LengthDist(2, 2))
    delays = arrival_delays(cfg)
    assert len(delays) == 3 and all(d > 0 for d in delays)
    summary, _ = run_bench(cfg)
    assert summary["duration_s"] >= sum(delays)


def test_prompts_file_and_timeouts(base_url, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello there", "max_tokens": 4}, {"messages": [{"role": "user", "content": "SLOW"}]},
            {"prompt": "a b c", "max_tokens": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = BenchConfig(base_url=base_url, model="tiny-k2", endpoint="completions", num_requests=3, concurrency=3,
                      prompts=load_prompts(str(path)), output_len=LengthDist(5, 5), timeout_s=0.5)
    summary, results = run_bench(cfg)
    assert summary["errors_by_kind"] == {"timeout": 1}
    assert [r.output_tokens for r in results] == [4, 0, 3]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="needs a 'prompt' or 'messages'"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_lines_split_across_reads_bad_chunks_and_connection_reuse(base_url):
    rows = ({"prompt": "SPLIT one", "max_tokens": 5}, {"prompt": "SPLIT two", "max_tokens": 3},
            {"prompt": "BADJSON", "max_tokens": 5})
    cfg = BenchConfig(base_url=base_url, model="tiny-k2", endpoint="completions", num_requests=3, concurrency=1,
                      prompts=rows)
    summary, results = run_bench(cfg)
    assert summary["errors_by_kind"] == {"bad_chunk": 1} and "not json" in results[2].error
    assert [(r.output_tokens, r.output_chunks) for r in results] == [(5, 5), (3, 3), (0, 0)]
    # concurrency 1: one connection, reused because each stream was read past [DONE]
    assert len(httpx.get(base_url + "/client_ports").json()) == 1


@pytest.mark.parametrize("text", ["0", "9:3", "a", "1:2:3"])
def test_length_distribution_rejects_bad_input(text):
    with pytest.raises(ValueError, match="expected N or LOW:HIGH"):
        LengthDist.parse(text)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve")
    bench_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--no-progress", *argv])
    return args.func(args)


def test_cli_sweep_writes_table_json_and_plots(base_url, tmp_path, capsys):
    out_json, plots = tmp_path / "bench.json", tmp_path / "plots"
    code = _cli(["--base-url", base_url, "--num-requests", "7", "--output-len", "4:8", "--input-len", "3",
                 "--sweep", "1,3", "--slo-ttft-ms", "5000", "--output", str(out_json), "--plot-dir", str(plots)])
    assert code == 0
    text = capsys.readouterr().out
    assert "model=tiny-k2" in text and "p99" in text and "goodput" in text and "concurrency" in text
    doc = json.loads(out_json.read_text())
    assert [r["concurrency"] for r in doc["runs"]] == [1, 3]
    assert all(len(r["requests"]) == 7 for r in doc["runs"])
    for name in ("latency_cdf.png", "sweep.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_counts_connection_failures(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code = _cli(["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-requests", "2",
                 "--output-len", "2"])
    assert code == 1
    assert "connect: 2" in capsys.readouterr().out


def test_request_body_asks_for_usage_and_fixed_lengths():
    from k2serve.cluster.bench import request_body

    cfg = BenchConfig(model="m", force_min_tokens=True, ignore_eos=True)
    spec = make_requests(cfg)[0]
    body = request_body(cfg, spec)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["min_tokens"] == body["max_tokens"] == spec.max_tokens and body["ignore_eos"] is True
    assert "min_tokens" not in request_body(BenchConfig(model="m"), spec)


def test_token_id_chunks_count_as_output_and_token_id_prompts_pass_through():
    """A server without a tokenizer (vLLM --skip-tokenizer-init) streams empty text with `token_ids`."""
    from k2serve.cluster.bench import chunk_output, request_body

    assert chunk_output({"choices": [{"index": 0, "text": "", "token_ids": [444]}]})
    assert not chunk_output({"choices": [{"index": 0, "text": "", "token_ids": None}]})
    cfg = BenchConfig(endpoint="completions", return_token_ids=True, prompts=({"prompt": [1, 2, 3], "max_tokens": 5},))
    spec = make_requests(cfg)[0]
    body = request_body(cfg, spec)
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 5 and body["return_token_ids"] is True
    assert "return_token_ids" not in request_body(BenchConfig(endpoint="completions"), spec)
