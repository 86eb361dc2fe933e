"""Gateway fixtures: the fake Gemini server, a throwaway CA + server certificate, and a real gateway on loopback."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nanofleet.config import parse_fleet
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.server import Gateway
from nanofleet.protos import inference_pb2, inference_pb2_grpc

from .fake_gemini import FakeGemini

FLEET_YAML = """
fleet: test
gateway:
  listen: 127.0.0.1:0
  upstream: {{kind: gemini, model: gemini-2.5-flash, base_url: "{base_url}", thinking_budget: 0, timeout: {timeout},
              max_retries: 2}}
  budgets: {{fleet_tokens_per_day: {fleet_budget}}}
defaults:
  routing:
    cloud_budget: {{tokens_per_day: {device_budget}}}
    apps:
      com.example.notes: {{privacy: sensitive}}
      com.example.small: {{tokens_per_day: 10}}
groups:
  clinic-tablets: {{routing: {{cloud: denied}}}}
  kiosks: {{routing: {{prefer: cloud}}}}
devices:
  dev-1: {{}}
  clinic-1: {{group: clinic-tablets}}
"""


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini()
    yield fake
    fake.close()


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("nanofleet test CA")).issuer_name(_name("nanofleet test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = Tls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return out


class Client:
    """A device's view of the gateway: a real grpc.aio channel and its token."""

    def __init__(self, address: str, token: str | None, ca: Path | None = None) -> None:
        if ca is not None:
            creds = grpc.ssl_channel_credentials(ca.read_bytes())
            self.channel = grpc.aio.secure_channel(address, creds)
        else:
            self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def generate(self, text: str = "hello", deadline: float = 10, **kw: Any) -> inference_pb2.GenerateResponse:
        return await self.stub.Generate(request(text, **kw), metadata=self.metadata, timeout=deadline)

    async def stream(self, text: str = "hello", deadline: float = 10, **kw: Any) -> list[inference_pb2.GenerateChunk]:
        call = self.stub.GenerateStream(request(text, **kw), metadata=self.metadata, timeout=deadline)
        return [chunk async for chunk in call]

    async def close(self) -> None:
        await self.channel.close()


def request(text: str = "hello", system: str = "", config: dict[str, Any] | None = None,
            **kw: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content=text)], system_instruction=system,
        config=inference_pb2.GenerationConfig(**(config or {})), **kw)


@dataclass
class Running:
    gateway: Gateway
    fake: FakeGemini
    clients: list[Client]

    def token(self, device: str, group: str | None = None, fleet: str = "test") -> str:
        return issue_token(self.gateway.db_path, device, fleet, group)

    def client(self, device: str | None = "dev-1", token: str | None = None, **kw: Any) -> Client:
        if token is None and device is not None:
            token = self.token(device, kw.pop("group", None))
        c = Client(self.gateway.address, token, kw.pop("ca", None))
        self.clients.append(c)
        return c


MakeGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_gateway(tmp_path: Path, fake_gemini: FakeGemini) -> AsyncIterator[MakeGateway]:
    started: list[Running] = []

    async def make(device_budget: int = 1_000_000, fleet_budget: int = 10_000_000, env: dict[str, str] | None = None,
                   upstream_timeout: float = 5, **kw: Any) -> Running:
        text = FLEET_YAML.format(base_url=fake_gemini.base_url, device_budget=device_budget,
                                 fleet_budget=fleet_budget, timeout=upstream_timeout)
        kw.setdefault("retry_base_delay", 0.01)
        kw.setdefault("auth_cache_ttl", 0.0)
        gw = Gateway(parse_fleet(text), tmp_path / f"gw{len(started)}",
                     env={"GEMINI_API_KEY": "test-key"} if env is None else env, **kw)
        await gw.start()
        running = Running(gw, fake_gemini, [])
        started.append(running)
        return running

    yield make
    for running in started:
        for c in running.clients:
            await c.close()
        await running.gateway.stop(grace=0.5)
