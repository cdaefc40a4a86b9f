"""benchmarks/router_overhead.py: the paced engine, and one small run with the worker and router in their
own processes (three layers measured, the verdict lines printed, the router's CPU read from /proc)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from layer_processes import LayerProcess, PacedEngine, process_cpu_s
from overhead_report import router_cost, verdict
from router_overhead import main, median_summary, pinning
from k2serve.worker.request import SamplingParams


def test_paced_engine_steps_every_running_request_together():
    async def run():
        engine = PacedEngine(step_s=0.01, token_id=7)
        params = SamplingParams(max_tokens=5, min_tokens=5)

        async def one(rid):
            return [out async for out in engine.generate(rid, [1, 2, 3], params)]

        return await asyncio.gather(one("a"), one("b"))

    for outs in asyncio.run(run()):
        assert [t for o in outs for t in o.new_token_ids] == [7] * 5
        counts = [o.completion_tokens for o in outs]
        assert counts == sorted(counts) and counts[-1] == 5
        assert outs[-1].finished and outs[-1].finish_reason == "length" and not any(o.finished for o in outs[:-1])


def test_paced_engine_merges_the_steps_a_slow_consumer_missed():
    async def run():
        engine = PacedEngine(step_s=0.01, token_id=7)
        outs = []
        async for out in engine.generate("r", [1], SamplingParams(max_tokens=6, min_tokens=6)):
            outs.append(out)
            time.sleep(0.035)  # blocks the loop past three steps
        return outs

    outs = asyncio.run(run())
    assert sum(len(o.new_token_ids) for o in outs) == 6 and outs[-1].completion_tokens == 6
    assert any(len(o.new_token_ids) > 1 for o in outs)


def test_process_cpu_reads_proc():
    cpu = process_cpu_s(os.getpid())
    assert cpu is not None and cpu > 0
    assert process_cpu_s(2 ** 22 + 12345) is None


def test_verdict_and_router_cost():
    def layer(tok_s, ttft, tokens=100):
        return {"output_throughput": tok_s, "ttft": {"p50_ms": ttft}, "total_output_tokens": tokens}

    layers = {"engine": layer(1000.0, 5.0), "router": layer(950.0, 6.5)}
    assert verdict(layers) == pytest.approx({"throughput_ratio": 0.95, "ttft_p50_added_ms": 1.5})
    report = {"layers": layers, "cpu_s": {"router": {"router": 0.3}, "router_1tok": {"router": 0.1}}}
    args = type("Args", (), {"num_requests": 10})()
    # 10 ms per request (1-token run); the other 0.2 s over 100 tokens = 2 ms per token
    assert router_cost(report, args) == pytest.approx({"per_request_ms": 10.0, "per_token_us": 2000.0})


def test_median_summary_of_runs():
    def run(tok_s, ttft, failed=0):
        return {"request_throughput": tok_s / 10, "output_throughput": tok_s, "total_output_tokens": 40,
                "completed": 4 - failed, "failed": failed, "ttft": {"p50_ms": ttft, "p99_ms": None},
                "itl": {"p50_ms": 1.0}, "e2e": {"p50_ms": 9.0}, "tpot": {"p50_ms": None}}

    merged = median_summary([run(100.0, 5.0), run(300.0, 9.0, failed=1), run(200.0, 6.0)])
    assert merged["output_throughput"] == 200.0 and merged["ttft"] == {"p50_ms": 6.0, "p99_ms": None}
    assert (merged["completed"], merged["failed"], merged["total_output_tokens"]) == (11, 1, 40)


def test_layer_process_reports_a_failed_start(tiny_model_dir):
    async def run():
        async with LayerProcess("worker", ["--engine", "paced", "--model-dir", str(tiny_model_dir / "missing")]):
            pass

    with pytest.raises(RuntimeError, match="worker process did not start"):
        asyncio.run(run())


def test_pinning_gives_each_process_two_cpus_of_its_own(monkeypatch):
    assert pinning(False) == {}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert pinning(True) == {"loadgen": {0, 1}, "worker": {2, 3}, "router": {4, 5}}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(SystemExit, match="needs 6 CPUs"):
        pinning(True)


def test_layer_process_runs_on_the_cpus_it_is_given(tiny_model_dir):
    async def run():
        async with LayerProcess("worker", ["--engine", "paced", "--model-dir", str(tiny_model_dir)], cpus={0}) as worker:
            return os.sched_getaffinity(worker.pid)

    assert asyncio.run(run()) == {0}


def test_small_run_measures_three_layers_in_processes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    code = main(["--model-dir", str(tiny_model_dir), "--num-requests", "4", "--concurrency", "2", "--repeats", "2",
                 "--input-len", "8", "--output-len", "4", "--step-ms", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert set(report["layers"]) == {"engine", "grpc", "router"}
    for name, summary in report["layers"].items():
        assert (summary["completed"], summary["failed"]) == (8, 0), name  # both runs
        assert summary["total_output_tokens"] == 16, name  # per run
        assert len(report["runs"][name]) == 2, name
    # /proc counts CPU in 10 ms ticks: a run this small may cost the worker less than one
    assert report["cpu_s"]["router"]["router"] + report["cpu_s"]["router"]["worker"] > 0
    assert report["cpu_s"]["grpc"]["worker"] >= 0
    assert "router" not in report["cpu_s"]["grpc"]  # the router process starts after the grpc row
    view = report["router_view"]  # from the router's /metrics: only the measured requests
    assert 0 < view["ttft_mean_ms"] < view["request_mean_ms"] and view["queue_mean_ms"] >= 0
    lines = printed.strip().splitlines()
    assert lines[-2].startswith("throughput_ratio: ") and lines[-1].startswith("ttft_p50_added_ms: ")
    assert float(lines[-2].split()[1]) == pytest.approx(report["throughput_ratio"], abs=1e-3)
    assert "us per output token" in printed and "router's own view" in printed
    hops = report["hops"]  # the floor: plain TCP between two processes, measured in the same run
    assert hops["gap_ms"] == 2 and all(hops[k] > 0 for k in ("idle_to_ms", "idle_back_ms", "busy_to_ms", "busy_back_ms"))
    assert "process hop (plain asyncio TCP" in printed
