"""Client side of the gateway's health: every service's status and the `nanofleet-detail` reason."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import GatewayError
from .server import DETAIL_KEY, INFERENCE_SERVICE, UPSTREAM_SERVICE

SERVICES = ("", INFERENCE_SERVICE, UPSTREAM_SERVICE)


def check(address: str, ca: str | Path | None = None, timeout: float = 5.0) -> dict[str, tuple[str, str]]:
    """service -> (SERVING | NOT_SERVING | …, detail) for the gateway at `address` (TLS when `ca` is given)."""
    if ca is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(address)
    report: dict[str, tuple[str, str]] = {}
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in SERVICES:
            try:
                response, call = stub.Check.with_call(health_pb2.HealthCheckRequest(service=service),
                                                      timeout=timeout)
            except grpc.RpcError as exc:
                raise GatewayError(f"gateway at {address} did not answer: {exc.code().name}: "
                                          f"{exc.details()}") from exc
            detail = dict(call.trailing_metadata() or ()).get(DETAIL_KEY, "")
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            report[service] = (status, str(detail))
    return report
