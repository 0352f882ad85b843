"""The checked-in generated code matches the .proto sources, imports with the installed
runtime, and JetStream's messages keep JetStream's names and field numbers on the wire."""

import filecmp
import shutil
from pathlib import Path

import pytest

from xlaserve.serving.proto import jetstream_pb2 as js
from xlaserve.serving.proto import xlaserve_pb2 as pb

PROTO_DIR = Path(__file__).resolve().parents[2] / "xlaserve" / "serving" / "proto"


def test_generated_code_is_up_to_date(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "xlaserve" / "serving" / "proto"
    out.mkdir(parents=True)
    for proto in ("xlaserve.proto", "jetstream.proto"):
        shutil.copy(PROTO_DIR / proto, out / proto)
    args = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(out / "xlaserve.proto"),
            str(out / "jetstream.proto")]  # fmt: skip
    assert grpc_tools.main(args) == 0
    for name in ("xlaserve_pb2.py", "xlaserve_pb2_grpc.py", "jetstream_pb2.py",
                 "jetstream_pb2_grpc.py", "xlaserve_pb2.pyi", "jetstream_pb2.pyi"):  # fmt: skip
        assert filecmp.cmp(out / name, PROTO_DIR / name, shallow=False), f"{name} is stale"


def fields(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_jetstream_layout():
    service = js.DESCRIPTOR.services_by_name["Orchestrator"]
    assert service.full_name == "jetstream_proto.Orchestrator"
    assert {m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming)
            for m in service.methods} == {  # fmt: skip
        "Decode": ("jetstream_proto.DecodeRequest", "jetstream_proto.DecodeResponse", True),
        "HealthCheck": (
            "jetstream_proto.HealthCheckRequest", "jetstream_proto.HealthCheckResponse", False
        ),
    }  # fmt: skip
    assert fields(js.DecodeRequest) == {
        "session_cache": 1, "priority": 3, "max_tokens": 4, "text_content": 5,
        "token_content": 6, "metadata": 7, "num_samples": 8, "lora_adapter_id": 9, "has_bos": 10,
    }  # fmt: skip
    assert fields(js.DecodeRequest.TextContent) == {"text": 1}
    assert fields(js.DecodeRequest.TokenContent) == {"token_ids": 1}
    assert fields(js.DecodeRequest.Metadata) == {"start_time": 1}
    assert fields(js.DecodeResponse) == {"initial_content": 2, "stream_content": 3}
    assert fields(js.DecodeResponse.StreamContent) == {"samples": 1}
    assert fields(js.DecodeResponse.StreamContent.Sample) == {"text": 1, "token_ids": 2}
    assert fields(js.HealthCheckResponse) == {"is_live": 1}


def test_every_sampling_param_has_a_proto_field():
    import dataclasses

    from xlaserve.engine.sampling_params import SamplingParams

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert names == set(fields(pb.SamplingParams))
