"""`k2serve serve` as a real subprocess: the default setup (tiny model, local Ray, one TP=EP=2 group, router)
comes up, answers the openai SDK (stream and not), reports its groups, exposes the router's and the worker
group's Prometheus series (moving under load), survives `k2serve bench` (every request counted), and stops
cleanly on Ctrl-C with no process of its own left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from router_harness import free_port

MODEL = "kimi-k2-instruct"  # the default config's model name


def process_tree(pid: int) -> dict[int, str]:
    """pid -> start time of every descendant of `pid` (from /proc; start times guard against pid reuse)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
        starts[int(entry)] = fields[19]
    out: dict[int, str] = {}
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            out[child] = starts[child]
            stack.append(child)
    return out


def still_running(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


class K2Process:
    """The installed `k2serve ARGS` with its output in a log file; `wait_ready` polls an HTTP URL."""

    def __init__(self, args: list[str], log_path: Path, home: Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(K2SERVE_HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "k2serve"), *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=home)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, url: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{url} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def interrupt(self, sig: int = signal.SIGINT, timeout: float = 90.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """Last resort: the process and everything it started."""
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid, start in tree.items():
            if still_running(pid, start):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def link_tiny_model(home: Path, tiny_model_dir: Path) -> None:
    """The default config's model lives at K2SERVE_HOME/tiny-k2: reuse the session's tiny checkpoint."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "tiny-k2").symlink_to(tiny_model_dir, target_is_directory=True)


@pytest.fixture(scope="module")
def serve(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("serve")
    link_tiny_model(tmp / "home", tiny_model_dir)
    port, discovery_port = free_port(), free_port()
    (tmp / "ports.yaml").write_text(f"controller:\n  discovery_port: {discovery_port}\n")
    proc = K2Process(["serve", "--config", str(tmp / "ports.yaml"), "--port", str(port)], tmp / "serve.log",
                     tmp / "home")
    proc.url, proc.discovery = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{discovery_port}"
    try:
        proc.wait_ready(proc.url + "/ready")
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.kill()


def test_chat_completions_non_stream_and_stream(serve):
    client = openai.OpenAI(api_key="none", base_url=serve.url + "/v1", timeout=60)
    messages = [{"role": "user", "content": "Say hello."}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens >= 1
    assert resp.usage.prompt_tokens > 5 and isinstance(resp.choices[0].message.content, str)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    assert text == resp.choices[0].message.content  # greedy: the same tokens either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [resp.choices[0].finish_reason]


def test_groups_are_published_with_rank_pids_and_status_shows_them(serve, capsys):
    from k2serve.cluster.cli import main

    groups = httpx.get(serve.discovery + "/v1/groups", timeout=5).json()["groups"]
    assert [(g["name"], g["healthy"], g["generation"]) for g in groups] == [("group-0", True, 1)]
    assert len(groups[0]["pids"]) == 2 and all(pid in process_tree(serve.proc.pid) for pid in groups[0]["pids"])
    assert main(["status", "--discovery", serve.discovery]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["group", "address", "gen", "controller", "grpc"]
    assert out[1].split()[:5] == ["group-0", groups[0]["address"], "1", "healthy", "serving"]


def scrape(url: str) -> dict[str, list]:
    """GET a Prometheus endpoint: family name (counters without _total) -> its samples."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(url, timeout=5)
    assert resp.status_code == 200, resp.text[:500]
    return {f.name: f.samples for f in text_string_to_metric_families(resp.text)}


def family(spec_name: str) -> str:
    return spec_name.removesuffix("_total")


def total(families: dict[str, list], name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    base = family(name.removesuffix("_count").removesuffix("_sum").removesuffix("_bucket"))
    return sum(s.value for s in families.get(base, ()) if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def worker_metrics_url(serve) -> str:
    groups = httpx.get(serve.discovery + "/v1/groups", timeout=5).json()["groups"]
    assert groups[0]["metrics_address"], groups
    return f"http://{groups[0]['metrics_address']}/metrics"


def chat_load(serve, n: int, max_tokens: int = 6) -> list:
    """`n` concurrent chat completions sharing a long system prompt (prefix cache hits)."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai.OpenAI(api_key="none", base_url=serve.url + "/v1", timeout=120)
    system = "You answer briefly. " * 12

    def one(i: int):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Count to {i}."}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_router_and_worker_metrics_move_under_load(serve, tiny_model_dir):
    from k2serve.router.metrics import METRICS as ROUTER_METRICS
    from k2serve.worker.metrics import METRICS as WORKER_METRICS

    worker_url = worker_metrics_url(serve)
    chat_load(serve, 1)  # the system prompt's blocks are cached before the load (8 in one step would all miss)
    before = scrape(worker_url)
    replies = chat_load(serve, 8)
    generated = sum(r.usage.completion_tokens for r in replies)
    router = scrape(serve.url + "/metrics")
    assert {family(s.name) for s in ROUTER_METRICS} <= set(router), set(router)
    assert total(router, "k2serve_router_requests_total", status="200") >= 8
    assert total(router, "k2serve_router_time_to_first_token_seconds_count") >= 8
    assert total(router, "k2serve_router_generation_tokens_total") >= generated > 0
    assert total(router, "k2serve_router_request_duration_seconds_count") >= 8
    from k2serve.worker.model.config import ModelConfig

    worker = wait_for_expert_tokens(worker_url, ModelConfig.from_dir(tiny_model_dir).num_experts_per_tok)
    assert {family(s.name) for s in WORKER_METRICS} <= set(worker), set(worker)
    grown = lambda name, **kw: total(worker, name, **kw) - total(before, name, **kw)  # noqa: E731
    assert grown("k2serve_worker_step_duration_seconds_count") > 0
    assert grown("k2serve_worker_generation_tokens_total") >= generated
    assert grown("k2serve_worker_prefix_cache_hit_tokens_total") > 0  # the shared system prompt
    assert total(worker, "k2serve_worker_running_requests") == 0
    assert total(worker, "k2serve_worker_kv_cache_usage_ratio") == 0
    for phase in ("dispatch", "combine"):  # TP=EP=2: tokens cross ranks both ways
        assert grown("k2serve_worker_all_to_all_bytes_total", phase=phase) > 0
        assert grown("k2serve_worker_all_to_all_duration_seconds_count", phase=phase) > 0


def wait_for_expert_tokens(url: str, k: int, timeout: float = 15.0) -> dict[str, list]:
    """Scrape until every MoE layer's expert tokens cover every computed token (the idle flush ran).

    Summed over both ranks, a layer routes top-k copies of each token plus at most one padding row per
    step (T padded to a multiple of 2); rank 0's own tokens alone would be about half.
    """
    deadline = time.monotonic() + timeout
    while True:
        worker = scrape(url)
        tokens = total(worker, "k2serve_worker_batch_size_tokens_sum")
        steps = total(worker, "k2serve_worker_batch_size_tokens_count")
        layers = {s.labels["layer"] for s in worker["k2serve_worker_expert_tokens"]
                  if s.name == "k2serve_worker_expert_tokens_total"}
        per_layer = {layer: total(worker, "k2serve_worker_expert_tokens_total", layer=layer) for layer in layers}
        if per_layer and all(k * tokens <= v <= k * (tokens + steps) for v in per_layer.values()):
            assert "0" not in per_layer  # layer 0 is dense
            return worker
        if time.monotonic() > deadline:
            raise AssertionError(f"expert tokens per layer {per_layer} vs k * tokens = {k * tokens} ({steps} steps)")
        time.sleep(0.2)


def test_bench_against_serve_counts_every_request(serve):
    """Issue 9: `k2serve bench` (16 requests at concurrency 4, plus one invalid request) against the serve."""
    from k2serve.cluster.bench import BenchConfig, run_bench

    rows = tuple({"prompt": "tell me about " + "the water " * (i % 5 + 1), "max_tokens": 6 + i % 4} for i in range(16))
    bad = {"prompt": "this request is invalid", "max_tokens": 0}
    cfg = BenchConfig(base_url=serve.url, model=MODEL, num_requests=17, concurrency=4, prompts=rows + (bad,),
                      ignore_eos=True,  # random weights: outputs of a few tokens may show no text (empty_output)
                      timeout_s=120)
    router_before = scrape(serve.url + "/metrics")
    summary, results = run_bench(cfg)
    router_after = scrape(serve.url + "/metrics")
    assert summary["num_requests"] == 17 and summary["completed"] == 16 and summary["failed"] == 1, \
        [(r.error_kind, r.error) for r in results if not r.ok]
    assert not results[-1].ok and results[-1].error_kind.startswith("http_4"), results[-1]
    assert list(summary["errors_by_kind"].values()) == [1]
    ok = results[:16]
    assert all(r.ok and r.usage_reported for r in ok)
    for r, row in zip(ok, rows):
        assert 1 <= r.output_tokens <= row["max_tokens"] and r.prompt_tokens > 0
        assert 0 < r.ttft_s <= r.e2e_s and len(r.itl_s) == r.output_chunks - 1
    grown = lambda name: total(router_after, name) - total(router_before, name)  # noqa: E731
    assert grown("k2serve_router_generation_tokens_total") == summary["total_output_tokens"]
    assert grown("k2serve_router_prompt_tokens_total") == summary["total_input_tokens"]
    assert summary["usage_reported"] == 16 and summary["output_throughput"] > 0
    for key in ("ttft", "e2e", "itl", "tpot"):
        assert summary[key]["p50_ms"] is not None, key
    assert summary["ttft"]["max_ms"] <= summary["e2e"]["max_ms"]
    assert summary["ttft"]["mean_ms"] <= summary["e2e"]["mean_ms"]


def test_ctrl_c_stops_every_process_it_started(serve):
    tree = process_tree(serve.proc.pid)
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree if Path(f"/proc/{pid}/comm").exists()}
    assert {"raylet", "gcs_server"} <= names, names
    assert serve.interrupt(signal.SIGINT) == 0, serve.log()[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(still_running(p, s) for p, s in tree.items()):
        time.sleep(0.5)
    left = [p for p, s in tree.items() if still_running(p, s)]
    assert not left, f"processes left behind: {left}"
    log = serve.log()
    assert "Traceback" not in log and "stopping" in log, log[-3000:]


@pytest.mark.parametrize("what", ["router", "discovery endpoint", "router of `k2serve router`"])
def test_a_port_in_use_fails_the_command_at_once_with_a_message(tmp_path, what):
    """Ports are bound before Ray, the groups or the model start: a port in use costs no startup, and
    nothing started later (Ray's processes take ports too) can take a port between choice and use."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy, free = taken.getsockname()[1], free_port()
        (tmp_path / "ports.yaml").write_text(
            f"controller:\n  discovery_port: {busy if what == 'discovery endpoint' else free_port()}\n")
        if what.startswith("router of"):
            args = ["router", "--group", "g0=127.0.0.1:1", "--port", str(busy)]
        else:
            args = ["serve", "--config", str(tmp_path / "ports.yaml"),
                    "--port", str(busy if what == "router" else free)]
        proc = K2Process(args, tmp_path / "out.log", tmp_path)
        code = proc.proc.wait(60)
    log = proc.log()
    assert code != 0, log
    assert f"cannot listen for the {what.split(' of ')[0]} on 127.0.0.1:{busy}" in log, log
    assert "starting" not in log and "generating" not in log, log  # no Ray, no groups, no model


def test_sigterm_finishes_the_stream_in_flight_refuses_new_requests_and_exits_0(tmp_path, tiny_model_dir):
    """What Kubernetes sends: the router stops taking requests at once (/ready and new requests answer 503),
    the stream in flight gets every token it asked for, then everything stops and the command exits with 0."""
    link_tiny_model(tmp_path / "home", tiny_model_dir)
    port = free_port()
    (tmp_path / "c.yaml").write_text(f"controller:\n  discovery_port: {free_port()}\n  drain_timeout_s: 60\n")
    proc = K2Process(["serve", "--config", str(tmp_path / "c.yaml"), "--port", str(port)], tmp_path / "serve.log",
                     tmp_path / "home")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + "/ready")
        client = openai.OpenAI(api_key="none", base_url=url + "/v1", timeout=120, max_retries=0)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=120, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [next(stream)]
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(url + "/ready", timeout=5).status_code == 503
        late = httpx.post(url + "/v1/chat/completions", timeout=5, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Late."}], "max_tokens": 4})
        assert late.status_code == 503, late.text
        chunks += list(stream)
        code = proc.proc.wait(120)
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert chunks[-1].usage.completion_tokens == 120
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert code == 0, proc.log()[-3000:]
