"""The committed generated code must be exactly what the .proto files generate (catches a missed `make protos`)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format

from nanofleet.protos import fleet_pb2, inference_pb2, inference_pb2_grpc
from nanofleet.protos.generate import HERE, generate


def test_committed_generated_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert {p.name for p in written} >= {"fleet_pb2.py", "inference_pb2.py", "inference_pb2_grpc.py", "fleet_pb2.pyi"}
    stale = [p.name for p in written if p.read_bytes() != (HERE / p.name).read_bytes()]
    assert not stale, f"generated files differ from the committed ones: {stale}; run `make protos` and commit"


def test_generated_modules_import_under_the_installed_package_name() -> None:
    assert inference_pb2_grpc.InferenceStub.__module__ == "nanofleet.protos.inference_pb2_grpc"
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert [m.name for m in service.methods] == ["Generate", "GenerateStream", "CountTokens"]
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert fleet_pb2.DESCRIPTOR.package == "nanofleet.v1"


def test_telemetry_round_trips_through_proto3_json() -> None:
    msg = fleet_pb2.Telemetry(device_id="pi-1", bd_seq=3, seq=255, ts_ms=1_700_000_000_123, cpu_percent=12.5,
                              thermal_level=fleet_pb2.THERMAL_LEVEL_SEVERE, temperatures_c={"cpu-thermal": 71.5})
    text = json_format.MessageToJson(msg)
    assert '"thermalLevel": "THERMAL_LEVEL_SEVERE"' in text
    assert json_format.Parse(text, fleet_pb2.Telemetry()) == msg
