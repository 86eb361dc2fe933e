"""Both HTTP APIs against their own OpenAPI schemas with schemathesis, in-process (ASGI) over real parts: a bounded,
derandomized run (a fixed example budget per operation, positive and negative inputs) that fails on any 5xx, any
answer outside its documented schema or status codes, and any 405 without a true `Allow`.

The agent runs its real API, sessions and router over the fake backend (agent/runtime/fake.py), not llama.cpp: the
run is about the HTTP contract, every example would otherwise cost a generation, and the real model is exercised by
tests/agent. The controller runs over a real SQLite store with a device in it, and a real CommandService on a real
mosquitto (the device never answers: a command that reaches it is a documented 504).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import Failure

from nanofleet.agent.runtime import FunctionBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.config import parse_fleet
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.commands import CommandOutcome, CommandService
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.mqtt import MqttClient
from nanofleet.protos import fleet_pb2

# 413: a body over the agent's limit is refused for its size before its content is looked at
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]}}})
# per operation and mode: the file takes ~25 s of CPU (no wall-clock assertion: the machine may be shared); a fixed
# budget and derandomize make every run try the same examples
EXAMPLES = 20


@schemathesis.check
def no_undocumented_server_error(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """5xx is a bug, except a documented 503 that says when to retry (no route can serve *now*)."""
    if response.status_code >= 500 and not (response.status_code == 503 and "retry-after" in response.headers):
        raise Failure(operation=case.operation.label, title=f"server error {response.status_code}",
                      message=response.text[:500], code="server_error")
    return None


def run(schema: Any, headers: dict[str, str] | None = None) -> None:
    """Every operation, positive then negative examples, validated with every schemathesis check but two: its plain
    5xx check (replaced by the one above) and `positive_data_acceptance`, because some limits depend on state a
    static schema cannot hold (max_tokens below the loaded model's context window, at least one non-system message,
    a session that exists): those answers are documented 400s and 404s."""
    from schemathesis.checks import not_a_server_error, positive_data_acceptance

    operations = [r.ok() for r in schema.get_all_operations()]
    assert operations
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                case.call_and_validate(headers=headers, excluded_checks=[not_a_server_error, positive_data_acceptance],
                                       additional_checks=[no_undocumented_server_error])

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, op.label  # nothing to get wrong in a call without inputs


@pytest.fixture
def agent(tmp_path: Path, tiny_gguf: Path) -> Iterator[AgentService]:
    settings_ = AgentSettings.model_validate({
        "device_id": "conformance", "data_dir": tmp_path / "data", "socket_path": tmp_path / "run" / "a.sock",
        "broker_url": None, "model": {"source": f"file:{tiny_gguf}", "n_ctx": 512, "n_parallel": 2}})
    svc = AgentService(settings_, warmup=False,
                       backend_factory=lambda file, spec: FunctionBackend(lambda req: "conformance"))
    yield svc


def test_agent_socket_api_conforms_to_its_openapi(agent: AgentService) -> None:
    run(schemathesis.openapi.from_asgi("/openapi.json", agent.app, config=CONFIG))


class _CommandsOnTheAppLoop:
    """The real CommandService, started on the event loop that serves the app (schemathesis runs ASGI apps on a
    loop of its own) at the first command, and stopped from the test's thread after the run."""

    def __init__(self, broker_url: str, fleet: str) -> None:
        self.broker_url, self.fleet = broker_url, fleet
        self.service: CommandService | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def send(self, device_id: str, kind: str, args: dict[str, str]) -> CommandOutcome:
        if self.service is None:
            self.loop = asyncio.get_running_loop()
            client = await MqttClient(self.broker_url, client_id=f"{self.fleet}-controller").start()
            await client.wait_connected(5)
            self.service = CommandService(client, self.fleet, default_timeout_s=0.2)
        return await self.service.send(device_id, kind, args)

    def stop(self) -> None:
        if self.service is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.service.client.stop(), self.loop).result(10)


def test_controller_rest_api_conforms_to_its_openapi(tmp_path: Path, broker: Any) -> None:
    fleet = f"conf-{uuid.uuid4().hex[:8]}"
    store = Store(tmp_path / "store.db")
    now = int(time.time() * 1000)
    store.write_status(fleet, fleet_pb2.DeviceStatus(fleet=fleet, device_id="pi-1", online=True, bd_seq=1, ts_ms=now,
                                                     telemetry_interval_s=10), now)
    token, token_hash = ensure_operator_token(tmp_path / "data")
    commands = _CommandsOnTheAppLoop(broker.url, fleet)
    app = create_app(store, parse_fleet(f"fleet: {fleet}\n"), operator_token_hash=token_hash, commands=commands,
                     usage_db=tmp_path / "usage.db")
    auth = {"Authorization": f"Bearer {token}"}
    try:
        run(schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG, headers=auth), headers=auth)
    finally:
        commands.stop()
        store.close()
