"""The agent process with a broker: the device session (another part) driven through our AgentHooks — birth with
the model state, a policy installed into the router, an unload-model command — against a real mosquitto."""

from __future__ import annotations

import json
import queue

import paho.mqtt.client as mqtt
from google.protobuf import json_format

from nanofleet.agent.service import AgentService
from nanofleet.protos import fleet_pb2, topics
from tests.agent.conftest import CHAT, uds_client
from tests.agent.test_cancel_concurrency import until


async def test_agent_with_broker_births_applies_policy_and_runs_commands(broker, make_settings) -> None:
    settings = make_settings(broker_url=broker.url, fleet="agt", device_id="svc-1", telemetry_interval_s=60,
                             model={"keep_alive": -1})
    got: queue.Queue[tuple[str, dict]] = queue.Queue()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.put((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    subscribed = sub.subscribe([(topics.status("agt", "svc-1"), 1), (topics.cmd_result("agt", "svc-1"), 1)])
    assert subscribed[0] == mqtt.MQTT_ERR_SUCCESS
    svc = AgentService(settings, warmup=False)
    await svc.start()
    try:
        async with uds_client(settings.socket_path) as c:
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200

        async def next_on(topic: str, pred=lambda m: True) -> dict:
            found: list[dict] = []

            def check() -> bool:
                while not got.empty():
                    t, m = got.get_nowait()
                    if t == topic and pred(m):
                        found.append(m)
                return bool(found)

            await until(check, what=f"a message on {topic}")
            return found[0]

        birth = await next_on(topics.status("agt", "svc-1"), lambda m: m.get("online"))
        assert birth["model"]["name"] and birth["model"]["availability"] == "MODEL_AVAILABILITY_AVAILABLE"
        policy = fleet_pb2.RoutingPolicy(fleet="agt", device_id="svc-1", version=5, prefer="local",
                                         cloud_allowed=False, thermal_limit=fleet_pb2.THERMAL_LEVEL_SEVERE)
        sub.publish(topics.policy("agt", "svc-1"), json_format.MessageToJson(policy), qos=1, retain=True)
        await until(lambda: svc.dispatcher.policy.version == 5, what="policy applied")
        cmd = fleet_pb2.Command(id="u1", kind="unload-model", issued_at_ms=1)
        sub.publish(topics.cmd("agt", "svc-1"), json_format.MessageToJson(cmd), qos=1)
        result = await next_on(topics.cmd_result("agt", "svc-1"),
                               lambda m: m.get("id") == "u1" and m.get("status") != "ack")
        assert result["status"] == "ok" and not svc.models.loaded
        async with uds_client(settings.socket_path) as c:
            status = (await c.get("/v1/status")).json()
        assert status["policy_version"] == 5 and status["model"]["loaded"] is False
    finally:
        await svc.stop()
        sub.publish(topics.policy("agt", "svc-1"), b"", qos=1, retain=True)
        sub.loop_stop()
        sub.disconnect()
    assert not settings.socket_path.exists()
