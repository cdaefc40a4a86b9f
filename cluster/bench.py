"""Load generator for any OpenAI-compatible server: streaming requests, latency and throughput metrics.

Definitions follow vLLM's `bench serve`: TTFT = time from sending the request to the first chunk that
carries output; TPOT = (e2e - TTFT) / (output_tokens - 1) per request (requests with more than one
output token); ITL = gaps between successive output chunks; e2e = send to end of stream. Throughputs
divide by the wall time of the whole run. Goodput = requests per second that completed AND met every
stated SLO (TTFT and/or TPOT). Output token counts come from the server's `usage`
(`stream_options.include_usage`), else from the number of output chunks. A failed request is counted
by kind (`http_<status>`, `timeout`, `connect`, `transport`, `stream_error`, `bad_chunk`, `empty_output`)
and never contributes to latencies.

The client is aiohttp, as in vLLM's `benchmark_serving`: the load generator shares the machine with the
server under test, and aiohttp spends about a third of httpx's CPU per streamed token
(benchmarks/router_overhead.py, `loadgen` column).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time has look "
         "two more write go see number no way could people my than first water been call who oil its now "
         "find long down day did get come made may part").split()


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed (`low == high`) or uniform over [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        """`"128"` (fixed) or `"64:256"` (uniform, both ends included)."""
        parts = text.split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or high is None or low < 1 or high < low:
            raise ValueError(f"length {text!r}: expected N or LOW:HIGH with 1 <= LOW <= HIGH")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run against `base_url`."""

    base_url: str = "http://127.0.0.1:8000"
    model: str = ""
    endpoint: str = "chat"  # "chat" -> /v1/chat/completions, "completions" -> /v1/completions
    num_requests: int = 100
    concurrency: int | None = 8  # max requests in flight; None = unbounded
    request_rate: float | None = None  # Poisson arrivals (requests/s); None = all at once
    input_len: LengthDist = LengthDist(128, 128)
    output_len: LengthDist = LengthDist(128, 128)
    prompts: tuple[dict[str, Any], ...] = ()  # from a JSONL file; overrides input_len
    seed: int = 0
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    timeout_s: float = 600.0
    api_key: str | None = None
    ignore_eos: bool = False  # vLLM/SGLang extension: always generate max_tokens
    force_min_tokens: bool = False  # send min_tokens = max_tokens (vLLM extension; k2serve's router accepts it)
    temperature: float = 0.0
    return_token_ids: bool = False  # vLLM extension: chunks carry token_ids (a tokenizer-less server streams no text)

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError("request_rate must be > 0")

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    ok: bool = False
    error_kind: str | None = None
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    output_chunks: int = 0
    usage_reported: bool = False
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def load_prompts(path: str) -> tuple[dict[str, Any], ...]:
    """JSONL: one object per line with "prompt" (text) or "messages" (chat), optional "max_tokens"."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
                raise ValueError(f"{path}:{n}: each line needs a 'prompt' or 'messages' field")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return tuple(rows)


def synthetic_prompt(rng: random.Random, num_words: int) -> str:
    """About one token per word for BPE tokenizers (common English words with a leading space)."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def make_requests(cfg: BenchConfig) -> list[RequestSpec]:
    """The request list, deterministic from the seed."""
    rng = random.Random(cfg.seed)
    specs = []
    for i in range(cfg.num_requests):
        max_tokens = cfg.output_len.sample(rng)
        if cfg.prompts:
            row = cfg.prompts[i % len(cfg.prompts)]
            max_tokens = int(row.get("max_tokens", max_tokens))
            prompt, messages = row.get("prompt"), row.get("messages")
            if cfg.endpoint == "chat" and messages is None:
                messages = [{"role": "user", "content": prompt}]
            if cfg.endpoint == "completions" and prompt is None:
                prompt = "\n".join(str(m.get("content", "")) for m in messages)
        else:
            prompt = synthetic_prompt(rng, cfg.input_len.sample(rng))
            messages = [{"role": "user", "content": prompt}]
        specs.append(RequestSpec(prompt, messages if cfg.endpoint == "chat" else None, max_tokens))
    return specs


def request_body(cfg: BenchConfig, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model, "max_tokens": spec.max_tokens, "stream": True, "temperature": cfg.temperature,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.force_min_tokens:
        body["min_tokens"] = spec.max_tokens
    if cfg.return_token_ids:
        body["return_token_ids"] = True
    if cfg.endpoint == "chat":
        body["messages"] = spec.messages
    else:
        body["prompt"] = spec.prompt
    return body


def chunk_output(chunk: dict[str, Any]) -> bool:
    """Whether a stream chunk carries generated output (text, token ids, reasoning or tool-call deltas)."""
    for choice in chunk.get("choices") or []:
        if choice.get("text") or choice.get("token_ids"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


def _observe_chunk(res: RequestResult, chunk: dict[str, Any], now: float, start: float, last: list[float]) -> None:
    if chunk.get("usage"):
        res.usage_reported = True
        res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        res.prompt_tokens = chunk["usage"].get("prompt_tokens")
    if not chunk_output(chunk):
        return
    res.output_chunks += 1
    if res.ttft_s is None:
        res.ttft_s = now - start
    else:
        res.itl_s.append(now - last[0])
    last[0] = now


def _observe_data(res: RequestResult, data: bytes, now: float, start: float, last: list[float]) -> bool:
    """Observe one `data:` payload; True when nothing more is to be observed ([DONE], or an error kept in res)."""
    if data == b"[DONE]":
        return True
    try:
        chunk = json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        chunk = None
    if not isinstance(chunk, dict):
        res.error_kind, res.error = "bad_chunk", data[:200].decode(errors="replace")
        return True
    if chunk.get("error"):
        res.error_kind, res.error = "stream_error", json.dumps(chunk["error"])[:200]
        return True
    _observe_chunk(res, chunk, now, start, last)
    return False


async def _read_stream(resp: aiohttp.ClientResponse, res: RequestResult, start: float) -> None:
    """Observe every `data:` line, then read the body to its end (past [DONE]) so the connection is reused.

    Lines are split out of each network read here rather than awaited one by one (`readline`): a token's
    event is two lines, and lines that arrived in one read share its timestamp anyway. An unterminated last
    line is an incomplete event, which SSE discards."""
    last, tail, done = [start], b"", False
    async for data in resp.content.iter_any():
        if done:
            continue
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        now = time.perf_counter()
        for line in lines:
            if line.startswith(b"data:") and _observe_data(res, line[5:].strip(), now, start, last):
                done = True
                break
        if res.error_kind is not None:
            return


async def send_request(session: aiohttp.ClientSession, cfg: BenchConfig, spec: RequestSpec) -> RequestResult:
    """Send one streaming request and measure it; never raises for request failures."""
    res = RequestResult()
    start = time.perf_counter()
    try:
        async with session.post(cfg.base_url.rstrip("/") + cfg.path, json=request_body(cfg, spec)) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")
                res.error_kind, res.error = f"http_{resp.status}", body[:200]
            else:
                await _read_stream(resp, res, start)
    except asyncio.TimeoutError as e:  # aiohttp's connect and read timeouts derive from it
        res.error_kind, res.error = "timeout", repr(e)
    except aiohttp.ClientConnectorError as e:
        res.error_kind, res.error = "connect", repr(e)
    except aiohttp.ClientError as e:
        res.error_kind, res.error = "transport", repr(e)
    res.e2e_s = time.perf_counter() - start
    if res.error_kind is None and res.ttft_s is None:
        res.error_kind, res.error = "empty_output", "stream ended without output"
    if res.error_kind is None:
        res.ok = True
        if not res.usage_reported:
            res.output_tokens = res.output_chunks
    return res


def arrival_delays(cfg: BenchConfig) -> list[float]:
    """Seconds to wait before each request: Poisson (exponential gaps) at request_rate, else zero."""
    if cfg.request_rate is None:
        return [0.0] * cfg.num_requests
    rng = random.Random(cfg.seed + 1)
    return [rng.expovariate(cfg.request_rate) for _ in range(cfg.num_requests)]


def _session(api_key: str | None, timeout_s: float, pool_size: int) -> aiohttp.ClientSession:
    """A session with keep-alive connections, at most `pool_size` of them: one per request in flight.

    `timeout_s` bounds connecting and each wait for data, not a whole stream (a long generation is fine
    while tokens keep coming)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=pool_size))


async def run_requests(cfg: BenchConfig, progress: Any = None) -> tuple[list[RequestResult], float]:
    """Run the whole benchmark; returns per-request results (in request order) and the wall time."""
    specs = make_requests(cfg)
    limit = asyncio.Semaphore(cfg.concurrency or cfg.num_requests)

    async def one(session: aiohttp.ClientSession, spec: RequestSpec) -> RequestResult:
        async with limit:
            result = await send_request(session, cfg, spec)
        if progress is not None:
            progress.update(1)
        return result

    async with _session(cfg.api_key, cfg.timeout_s, pool_size=cfg.concurrency or cfg.num_requests) as session:
        start = time.perf_counter()
        tasks = []
        for spec, delay in zip(specs, arrival_delays(cfg)):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, spec)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def latency_stats(values_s: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (and std, max) in milliseconds; None when there are no values."""
    if not values_s:
        return {k: None for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "max_ms")}
    a = np.asarray(values_s) * 1e3
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99)),
            "std_ms": float(a.std()), "max_ms": float(a.max())}


def meets_slo(r: RequestResult, cfg: BenchConfig) -> bool:
    if not r.ok:
        return False
    if cfg.slo_ttft_s is not None and (r.ttft_s is None or r.ttft_s > cfg.slo_ttft_s):
        return False
    tpot = r.tpot_s
    return cfg.slo_tpot_s is None or tpot is None or tpot <= cfg.slo_tpot_s


def summarize(cfg: BenchConfig, results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """The report: counts, errors by kind, throughputs, goodput and latency statistics."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(meets_slo(r, cfg) for r in results)
    return {
        "endpoint": cfg.path, "model": cfg.model, "num_requests": len(results),
        "concurrency": cfg.concurrency, "request_rate": cfg.request_rate,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors_by_kind": dict(Counter(r.error_kind for r in results if not r.ok)),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "usage_reported": sum(r.usage_reported for r in ok),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "slo_ttft_ms": None if cfg.slo_ttft_s is None else cfg.slo_ttft_s * 1e3,
        "slo_tpot_ms": None if cfg.slo_tpot_s is None else cfg.slo_tpot_s * 1e3,
        "goodput": good / duration_s,
        "ttft": latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl": latency_stats([g for r in ok for g in r.itl_s]),
        "e2e": latency_stats([r.e2e_s for r in ok]),
    }


def run_bench(cfg: BenchConfig, progress: Any = None) -> tuple[dict[str, Any], list[RequestResult]]:
    """Run one benchmark synchronously; returns (summary, per-request results)."""
    results, duration = asyncio.run(run_requests(cfg, progress))
    return summarize(cfg, results, duration), results


def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id that GET /v1/models lists; raises aiohttp.ClientError or OSError when unreachable."""
    models = asyncio.run(_get_models(base_url.rstrip("/") + "/v1/models", api_key, timeout_s)).get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no models; pass --model")
    return str(models[0]["id"])


async def _get_models(url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    async with _session(api_key, timeout_s, pool_size=1) as session, session.get(url, raise_for_status=True) as resp:
        return await resp.json(content_type=None)
