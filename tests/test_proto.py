"""The k2serve.v1 wire contract: stubs are fresh, importable as k2serve.v1, sampling fields optional."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from k2serve.v1 import worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("k2_proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_not_stale(tmp_path):
    written = _load_generator().generate(tmp_path)
    assert written, "the generator wrote nothing"
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = REPO / "proto" / rel
        assert committed.exists(), f"{rel} is missing: run `python proto/generate.py`"
        assert committed.read_text() == fresh.read_text(), f"{rel} is stale: run `python proto/generate.py`"


def test_every_sampling_field_is_optional():
    for field in worker_pb2.SamplingParams.DESCRIPTOR.fields:
        if not field.is_repeated:
            assert field.has_presence, f"SamplingParams.{field.name} must be `optional`"
    params = worker_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature"), "an explicit 0 must be distinguishable from unset"


def test_generate_response_is_a_oneof_and_service_is_complete():
    resp = worker_pb2.GenerateResponse(error=worker_pb2.GenerateError(message="x", status=400))
    assert resp.WhichOneof("response") == "error"
    methods = {m.name for m in worker_pb2.DESCRIPTOR.services_by_name["Worker"].methods}
    assert methods == {"Generate", "Session", "Abort", "GetLoad", "GetModelInfo"}
    assert hasattr(worker_pb2_grpc, "WorkerServicer") and hasattr(worker_pb2_grpc, "WorkerStub")


def test_round_trip_guided_tool_call():
    guide = worker_pb2.ToolCallGuide(tools_json="[]", mode="named", name="get_weather")
    req = worker_pb2.GenerateRequest(request_id="r", prompt_token_ids=[1, 2],
                                     guided=worker_pb2.GuidedSpec(tool_call=guide))
    back = worker_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back.guided.WhichOneof("kind") == "tool_call" and back.guided.tool_call.name == "get_weather"
