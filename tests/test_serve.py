"""`k2serve serve` as a real subprocess: the default setup (tiny model, local Ray, one TP=EP=2 group, router)
comes up, answers the openai SDK (stream and not), reports its groups, and stops cleanly on Ctrl-C with
no process of its own left behind."""

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

ROOT = Path(__file__).resolve().parent.parent
MODEL = "kimi-k2-instruct"  # the default config's model name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """`python -m cluster.cli ARGS` with its output in a log file; `wait_ready` polls an HTTP URL."""

    def __init__(self, args: list[str], log_path: Path, home: Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONPATH=str(ROOT), K2SERVE_HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT)

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
    from cluster.cli import main

    groups = httpx.get(serve.discovery + "/v1/groups", timeout=5).json()["groups"]
    assert [(g["name"], g["healthy"], g["generation"]) for g in groups] == [("group-0", True, 1)]
    assert len(groups[0]["pids"]) == 2 and all(pid in process_tree(serve.proc.pid) for pid in groups[0]["pids"])
    assert main(["status", "--discovery", serve.discovery]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["group", "address", "gen", "controller", "grpc"]
    assert out[1].split()[:5] == ["group-0", groups[0]["address"], "1", "healthy", "serving"]


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
