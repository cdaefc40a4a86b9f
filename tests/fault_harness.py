"""The fault suite's machinery: a two-group cluster with three routers, a load that checks every answer
against an uninterrupted run, a TCP proxy that can reset its connections, and the figures table.

The groups compute in float32: with the tiny checkpoint's random weights, bf16 rounding that differs
between a prefill and a decode (a continuation re-prefills what was decoded) or between batch shapes turns
near-ties into different greedy tokens, which would hide what the suite checks (that a migration loses or
repeats nothing).

The cluster is real processes on loopback (test_serve.K2Process): `k2serve serve` (the controller, two
worker groups of two ranks each, router R0 with the in-process group source), `k2serve router` R1 (groups
from the discovery endpoint) and `k2serve router` R2 (static groups, each reached through a FaultProxy).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router_harness import free_port
from test_serve import K2Process

MODEL = "kimi-k2-tiny"
NUM_KV_BLOCKS = 256
REQUEST_TIMEOUT = 120.0  # a request not done by then is hung
PROMPTS = [f"fault suite request {i}: tell me about the number {i * 7}" for i in range(8)]
MAX_TOKENS = 48


def cluster_yaml(model_dir: Path, discovery_port: int, router: str = "{}") -> str:
    return f"""
model: {{path: "{model_dir}", name: {MODEL}}}
groups:
  - {{name: g0, tp: 2, ep: 2, collective_timeout_s: 15}}
  - {{name: g1, tp: 2, ep: 2, collective_timeout_s: 15}}
engine: {{max_num_seqs: 16, num_kv_blocks: {NUM_KV_BLOCKS}, block_size: 16, max_num_batched_tokens: 512,
          dtype: float32}}
router: {router}
controller: {{health_interval_s: 0.5, discovery_port: {discovery_port}, drain_timeout_s: 20}}
ray: {{num_cpus: 8}}
"""


ROUTER = ("{policy: least_load, stall_timeout_s: 1.0, stream_write_timeout_s: 2.0, max_migrations: 3, "
          "send_buffer_bytes: 8192}")


# ---------------------------------------------------------------- a TCP proxy that can reset its connections


class FaultProxy:
    """Forwards 127.0.0.1:`port` to the current address of one group (looked up per connection, so a
    replaced group is reached too); `reset()` ends every connection with a TCP RST, both ways."""

    def __init__(self, resolve):
        self.resolve = resolve
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                host, port = self.resolve().rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)), timeout=5)
                upstream.settimeout(None)
            except Exception:  # noqa: BLE001 - the group is being replaced: refuse this one, serve the next
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self) -> int:
        """RST every open connection; returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        self.resets += len(pairs)
        return len(pairs)

    def close(self) -> None:
        self._listener.close()
        self.reset()


# ---------------------------------------------------------------- the cluster


class FaultStack:
    """`k2serve serve` (R0), `k2serve router` R1 (discovery) and R2 (static groups behind FaultProxies)."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp = tmp
        self.discovery = f"http://127.0.0.1:{free_port()}"
        dport = int(self.discovery.rsplit(":", 1)[1])
        (tmp / "cluster.yaml").write_text(cluster_yaml(model_dir, dport, ROUTER))
        self.urls = {name: f"http://127.0.0.1:{free_port()}" for name in ("R0", "R1", "R2")}
        self.procs: dict[str, K2Process] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.procs["R0"] = K2Process(["serve", "--config", str(tmp / "cluster.yaml"), "--port", self.port("R0")],
                                     tmp / "serve.log", tmp)

    def port(self, router: str) -> str:
        return self.urls[router].rsplit(":", 1)[1]

    def start_routers(self) -> None:
        """R1 and R2, once the groups are up (R2's proxies resolve the groups' addresses)."""
        self.start_router("R1")
        for name in ("g0", "g1"):
            self.proxies[name] = FaultProxy(lambda name=name: self.groups()[name]["address"])
        self.start_router("R2")

    def start_router(self, router: str) -> None:
        if router == "R1":
            where = ["--discovery", self.discovery]
        else:
            where = [arg for name, proxy in self.proxies.items()
                     for arg in ("--group", f"{name}=127.0.0.1:{proxy.port}")]
        self.procs[router] = K2Process(["router", "--config", str(self.tmp / "cluster.yaml"), *where,
                                        "--port", self.port(router)], self.tmp / f"{router}.log", self.tmp)
        self.procs[router].wait_ready(self.urls[router] + "/ready")

    def wait_ready(self) -> None:
        self.procs["R0"].wait_ready(self.urls["R0"] + "/ready", timeout=300)
        self.start_routers()

    def groups(self) -> dict[str, dict]:
        return {g["name"]: g for g in httpx.get(self.discovery + "/v1/groups", timeout=5).json()["groups"]}

    def router_total(self, name: str, routers=("R0", "R1", "R2"), **labels) -> float:
        return sum(scrape_total(self.urls[r] + "/metrics", name, **labels) for r in routers
                   if self.procs[r].proc.poll() is None)

    def kv_blocks_in_use(self, timeout: float = 30.0) -> int:
        """Blocks in use over both groups once they are back to idle (or what remains after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            used = 0
            for g in self.groups().values():
                ratio = scrape_total(f"http://{g['metrics_address']}/metrics", "k2serve_worker_kv_cache_usage_ratio")
                used += round(ratio * NUM_KV_BLOCKS)
            if used == 0 or time.monotonic() > deadline:
                return used
            time.sleep(0.5)

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        for name in ("R2", "R1", "R0"):
            proc = self.procs.get(name)
            if proc is not None and proc.proc.poll() is None:
                try:
                    proc.interrupt(signal_term(), timeout=90)
                except Exception:  # noqa: BLE001 - teardown must not leave processes behind
                    proc.kill()


def signal_term():
    import signal
    return signal.SIGTERM


def scrape_total(url: str, name: str, **labels) -> float:
    """Sum of the samples called `name` (with these labels) at a Prometheus endpoint."""
    text = httpx.get(url, timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class GroupWatch:
    """Polls discovery from a fault on: when `group` was first seen unhealthy or changed (detected), and
    when a new generation of it was healthy (replaced)."""

    def __init__(self, stack: FaultStack, group: str):
        self.stack, self.group = stack, group
        self.before = stack.groups()[group]
        self.start = time.monotonic()
        self.detected: float | None = None
        self.replaced: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                now = self.stack.groups().get(self.group)
            except httpx.HTTPError:
                continue
            elapsed = time.monotonic() - self.start
            changed = now is None or now["generation"] != self.before["generation"]
            if self.detected is None and (changed or not now["healthy"]):
                self.detected = elapsed
            if changed and now is not None and now["healthy"]:
                self.replaced = elapsed
                return

    def wait_replaced(self, timeout: float = 180.0) -> dict:
        self._thread.join(timeout)
        self._stop.set()
        assert self.replaced is not None, f"{self.group} was not replaced: {self.stack.groups()}"
        return self.stack.groups()[self.group]


# ---------------------------------------------------------------- load


@dataclass
class Answer:
    """One streamed completion as the client saw it."""

    router: str
    prompt: str
    status: int | None = None
    text: str = ""
    finish: str | None = None
    usage: dict | None = None
    error: str | None = None
    tokens: int = 0
    longest_pause: float = 0.0
    retried: int = 0  # times the client sent it to another router (503 or connection refused)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finish == "length"


async def stream_one(client: httpx.AsyncClient, urls: dict[str, str], order: list[str], prompt: str,
                     started: asyncio.Event | None = None) -> Answer:
    """A greedy streamed completion on the first router of `order` that takes it (like a load balancer
    that retries a 503 or a refused connection on the next replica)."""
    answer = Answer(order[0], prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    for router in order:
        answer.router = router
        try:
            await _stream_into(client, urls[router] + "/v1/completions", body, answer, started)
        except httpx.ConnectError as exc:
            answer.error = f"connect: {exc}"
        if answer.status == 503 or (answer.error or "").startswith("connect"):
            answer.retried += 1
            answer.status, answer.error = None, None
            continue
        break
    return answer


async def _stream_into(client, url: str, body: dict, answer: Answer, started: asyncio.Event | None) -> None:
    async with client.stream("POST", url, json=body) as resp:
        answer.status = resp.status_code
        if resp.status_code != 200:
            answer.error = (await resp.aread()).decode()[:300]
            return
        last = time.monotonic()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            now = time.monotonic()
            answer.longest_pause, last = max(answer.longest_pause, now - last), now
            if "error" in payload:
                answer.error = payload["error"]["message"]
            elif payload["choices"]:
                answer.text += payload["choices"][0]["text"]
                answer.tokens += 1
                answer.finish = payload["choices"][0]["finish_reason"] or answer.finish
                if started is not None and answer.tokens >= 2:
                    started.set()
            if payload.get("usage"):
                answer.usage = payload["usage"]


@dataclass
class LoadResult:
    answers: list[Answer]
    hung: int
    fault_at: float  # seconds after the load started
    rechecked: int = 0  # answers that differed from the baseline and were compared with a fresh run

    def wrong(self, baseline: dict[str, Answer], urls: dict[str, str]) -> list[Answer]:
        """Answers that finished but differ from an uninterrupted run: text, prompt or completion tokens
        (cached tokens depend on what the prefix caches hold). An answer that differs from the baseline is
        compared with a fresh uninterrupted run too: in a group, what the prefix cache holds and how a step's
        tokens are padded and spread over the experts move float32 sums by an ulp, and with random weights a
        near-tie can turn the first greedy token (a migration's error would not repeat in the fresh run)."""
        suspects = [a for a in self.answers if a.ok and (a.text != baseline[a.prompt].text
                                                         or _counts(a) != _counts(baseline[a.prompt]))]
        if not suspects:
            return []
        again = {a.prompt: a for a in run_load(urls, [["R0"]], prompts=[s.prompt for s in suspects]).answers}
        self.rechecked = len(suspects)
        return [a for a in suspects if a.text != again[a.prompt].text or _counts(a) != _counts(again[a.prompt])]


def _counts(answer: Answer) -> tuple:
    return answer.usage["prompt_tokens"], answer.usage["completion_tokens"]


def run_load(urls: dict[str, str], orders: list[list[str]], inject=None, prompts=PROMPTS) -> LoadResult:
    """Stream every prompt (prompt i on routers orders[i % len]), call `inject()` (in a thread) once they all
    stream, and wait for them; a request not done within REQUEST_TIMEOUT counts as hung."""
    async def main() -> LoadResult:
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=5)) as client:
            events = [asyncio.Event() for _ in prompts]
            tasks = [asyncio.create_task(stream_one(client, urls, orders[i % len(orders)], p, events[i]))
                     for i, p in enumerate(prompts)]
            start = time.monotonic()
            await asyncio.wait([asyncio.create_task(e.wait()) for e in events], timeout=30)
            fault_at = time.monotonic() - start
            if inject is not None:
                await asyncio.to_thread(inject)
            done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT)
            for task in pending:
                task.cancel()
            return LoadResult([t.result() for t in done], len(pending), fault_at)
    return asyncio.run(main())


# ---------------------------------------------------------------- the figures


@dataclass
class Row:
    case: str
    sent: int
    succeeded: int
    migrated: int
    failed: int
    hung: int
    kv_blocks_after: int
    detect_s: float | None = None
    replace_s: float | None = None
    longest_pause_s: float | None = None
    notes: str = ""


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def render(self) -> str:
        head = ("case", "sent", "ok", "migrated", "failed", "hung", "KV blocks after", "detect s", "replace s",
                "longest pause s", "notes")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = (r.case, r.sent, r.succeeded, r.migrated, r.failed, r.hung, r.kv_blocks_after,
                     _seconds(r.detect_s), _seconds(r.replace_s), _seconds(r.longest_pause_s), r.notes)
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
