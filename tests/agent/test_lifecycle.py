"""Model lifecycle with the real tiny model: lazy load, keep_alive (0 / N s / -1), RAM guard, unload and reload
commands, builtin generation, and the hooks the MQTT device session calls."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx

from nanofleet.agent.runtime.base import ChatRequest
from nanofleet.agent.runtime.lifecycle import ModelManager
from nanofleet.agent.service import AgentService
from nanofleet.config import ModelSpec
from nanofleet.protos import fleet_pb2
from tests.agent.conftest import CHAT
from tests.agent.test_cancel_concurrency import until

HI = ChatRequest([{"role": "user", "content": "hi"}], max_tokens=2)


def manager(tmp_path: Path, tiny_gguf: Path, **spec) -> ModelManager:
    return ModelManager(ModelSpec(source=f"file:{tiny_gguf}", n_ctx=256, **spec), tmp_path / "cache",
                        tmp_path / "private", warmup=False)


ME = {"fleet": "demo", "device_id": "dev-test"}  # policies are addressed to the device


async def test_lazy_load_and_keep_alive_zero_unloads_at_once(tmp_path: Path, tiny_gguf: Path) -> None:
    m = manager(tmp_path, tiny_gguf, keep_alive=0)
    assert not m.loaded and m.status().availability == "available"
    async with m.use() as backend:
        assert m.loaded
        assert (await backend.generate(HI)).usage.completion_tokens == 2
    await until(lambda: not m.loaded, what="unload")
    await m.settle()
    async with m.use() as backend:  # loads again on the next use
        await backend.generate(HI)
    assert m.loads == 2
    await m.close()


async def test_idle_keep_alive_unloads_after_the_delay(tmp_path: Path, tiny_gguf: Path) -> None:
    m = manager(tmp_path, tiny_gguf, keep_alive=0.2)
    async with m.use() as backend:
        await backend.generate(HI)
    assert m.loaded  # still warm right after the request
    await until(lambda: not m.loaded, within=5, what="idle unload")
    await m.close()


async def test_keep_alive_minus_one_never_schedules_unload(tmp_path: Path, tiny_gguf: Path) -> None:
    m = manager(tmp_path, tiny_gguf, keep_alive=-1)
    async with m.use() as backend:
        await backend.generate(HI)
    assert m.loaded and m._idle is None
    await m.close()
    assert not m.loaded


async def test_unload_waits_for_requests_in_flight(tmp_path: Path, tiny_gguf: Path) -> None:
    m = manager(tmp_path, tiny_gguf, keep_alive=-1)
    async with m.use() as backend:
        unloading = asyncio.create_task(m.unload())
        await asyncio.sleep(0)
        assert not m.loaded  # new requests would load afresh...
        assert (await backend.generate(HI)).usage.completion_tokens == 2  # ...but this one finishes
    assert await unloading is True
    await m.close()


async def test_refuses_to_load_without_enough_free_ram(make_settings) -> None:
    free = {"bytes": 8 << 20}
    svc = AgentService(make_settings(), warmup=False, free_ram=lambda: free["bytes"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"queue": "deny"}})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "insufficient_ram"
        assert "MB free" in r.json()["error"]["message"]
        status = (await c.get("/v1/status")).json()
        assert status["model"]["loaded"] is False
        assert status["model"]["reason"].startswith("insufficient_ram: model needs about")
        assert status["routes"]["local"]["healthy"] is False
        assert svc.model_state().reason.startswith("insufficient_ram")
        queued = await c.post("/v1/chat/completions", json=CHAT)  # queueing allowed: kept until the model fits
        assert queued.status_code == 202 and queued.headers["x-nanofleet-reason"] == "model_unavailable"
        free["bytes"] = 64 << 30
        svc.models.refused_at = 0.0  # as if the retry delay had passed
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert (await c.get("/v1/status")).json()["model"]["reason"] == ""
    await svc.models.close()


async def test_builtin_tiny_model_is_generated_on_first_use(tmp_path: Path) -> None:
    m = ModelManager(ModelSpec(source="builtin:tiny-test", n_ctx=256), tmp_path / "cache", tmp_path / "p",
                     warmup=True)
    assert m.status().availability == "downloadable"
    async with m.use() as backend:
        await backend.generate(HI)
    assert m.status().availability == "available" and (tmp_path / "cache" / "tiny-test.gguf").exists()
    await m.close()


async def test_reload_switches_to_a_new_model(tmp_path: Path, tiny_gguf: Path) -> None:
    m = manager(tmp_path, tiny_gguf, keep_alive=-1)
    other = tmp_path / "other.gguf"
    await asyncio.to_thread(shutil.copy, tiny_gguf, other)
    await m.reload(ModelSpec(source=f"file:{other}", n_ctx=256))
    assert m.loaded and m.status().name == "other"
    async with m.use() as backend:
        assert backend.model_name == "other"
    await m.close()


async def test_hooks_commands_policy_and_metrics(make_settings) -> None:
    svc = AgentService(make_settings(model={"keep_alive": -1}), warmup=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        state = svc.model_state()
        assert state.loaded and state.availability == fleet_pb2.MODEL_AVAILABILITY_AVAILABLE
        assert state.name == Path(svc.settings.model.source[5:]).stem
        assert svc.agent_metrics().route_counts["local"] == 1
        res = await svc.handle_command(fleet_pb2.Command(id="c1", kind="unload-model"))
        assert (res.id, res.status, res.device_id) == ("c1", "ok", "dev-test") and not svc.models.loaded
        res = await svc.handle_command(fleet_pb2.Command(id="c2", kind="reload-model"))
        assert res.status == "ok" and svc.models.loaded
        res = await svc.handle_command(fleet_pb2.Command(id="c4", kind="drain-queue"))
        assert (res.status, res.data["queue_depth"]) == ("ok", "0")
        res = await svc.handle_command(fleet_pb2.Command(id="c3", kind="self-destruct"))
        assert res.status == "error" and "unknown command" in res.message
        await svc.apply_policy(fleet_pb2.RoutingPolicy(**ME, version=9, prefer="local", cloud_allowed=True,
                                                       thermal_limit=fleet_pb2.THERMAL_LEVEL_SEVERE,
                                                       max_local_prompt_tokens=10))
        assert svc.agent_metrics().policy_version == 9
        assert (await c.get("/v1/status")).json()["policy_version"] == 9
        long = {**CHAT, "messages": [{"role": "user", "content": "x" * 100}]}
        r = await c.post("/v1/chat/completions", json=long)  # too large for local, no cloud: waiting cannot help
        assert r.status_code == 403 and r.headers["x-nanofleet-reason"] == "prompt_too_large"
        assert r.headers["x-nanofleet-route"] == "reject" and r.json()["error"]["code"] == "route_forbidden"
        assert "retry-after" not in r.headers
        assert svc.agent_metrics().route_counts["rejected"] == 1
    await svc.models.close()


async def test_hot_device_stops_local_serving(make_settings, tmp_path: Path) -> None:
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    for name, value in {"type": "cpu-thermal", "temp": "91000", "trip_point_0_temp": "80000",
                        "trip_point_0_type": "passive", "trip_point_1_temp": "100000",
                        "trip_point_1_type": "critical"}.items():
        (zone / name).write_text(value + "\n")
    svc = AgentService(make_settings(sysfs_root=tmp_path / "sys"), warmup=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        status = (await c.get("/v1/status")).json()
        assert status["device"]["thermal_level"] >= fleet_pb2.THERMAL_LEVEL_SEVERE
        r = await c.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"queue": "deny"}})
        assert r.status_code == 503 and r.headers["x-nanofleet-reason"].startswith("thermal_")
        r = await c.post("/v1/chat/completions", json=CHAT)  # allowed to wait: kept in the offline queue
        assert (r.status_code, r.headers["x-nanofleet-route"]) == (202, "queue")
        assert r.headers["x-nanofleet-reason"].startswith("thermal_")
        assert not svc.models.loaded  # never touched the model
    await svc.models.close()


async def test_policy_with_a_new_model_switches_to_it(make_settings, tmp_path: Path, tiny_gguf: Path) -> None:
    svc = AgentService(make_settings(model={"keep_alive": -1}), warmup=False)
    other = tmp_path / "fleet-model.gguf"
    await asyncio.to_thread(shutil.copy, tiny_gguf, other)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).json()["model"] == tiny_gguf.stem
        await svc.apply_policy(fleet_pb2.RoutingPolicy(**ME, version=2, prefer="local", model_source=f"file:{other}"))
        assert svc.updater is not None
        await until(lambda: svc.updater.state == "applied", what="the update to the policy's model")
        assert svc.models.loaded  # loaded (and warm) beside the old one before the switch, not on first use
        assert (await c.post("/v1/chat/completions", json=CHAT)).json()["model"] == "fleet-model"
        await svc.apply_policy(fleet_pb2.RoutingPolicy(**ME, version=3, prefer="local", model_source="ftp://nope"))
        assert svc.models.spec.source == f"file:{other}" and svc.dispatcher.policy.version == 3
    await svc.models.close()


async def test_a_failed_warm_up_leaves_the_model_not_loaded_with_the_reason(make_settings, caplog) -> None:
    from nanofleet.agent.runtime.base import BackendUnavailable
    from nanofleet.agent.runtime.fake import FunctionBackend

    made: list[FunctionBackend] = []
    closed: list[FunctionBackend] = []
    broken = {"on": True}

    def answer(request: Any) -> str:
        if broken["on"]:
            raise BackendUnavailable("llama.cpp: failed to decode the batch")
        return "ok"

    class Tracked(FunctionBackend):
        async def close(self) -> None:
            closed.append(self)

    def factory(file: Any, spec: Any) -> FunctionBackend:
        made.append(Tracked(answer))
        return made[-1]

    svc = AgentService(make_settings(), warmup=True, backend_factory=factory)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"queue": "deny"}})
        assert r.status_code == 503 and r.json()["error"]["code"] == "warmup_failed"
        status = (await c.get("/v1/status")).json()
        assert status["model"]["loaded"] is False and not svc.models.loaded
        assert status["model"]["reason"].startswith("warmup_failed: llama.cpp: failed to decode the batch")
        assert status["routes"]["local"]["healthy"] is False
        assert svc.model_state().loaded is False and svc.model_state().reason.startswith("warmup_failed")
        assert closed == made  # the half-loaded model's memory is given back
        assert any("warmup_failed" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        broken["on"] = False
        svc.models.refused_at = 0.0  # as if the rest had passed
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and svc.models.loaded and svc.model_state().reason == ""
    await svc.models.close()


async def test_the_ram_guard_says_when_it_guesses_or_cannot_read_free_ram(make_settings, tmp_path: Path,
                                                                          caplog) -> None:
    from nanofleet.agent.models.memory import RamGuard, estimate_bytes

    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 4096)  # a header gguf cannot read
    guard = RamGuard()
    for _ in range(3):
        assert estimate_bytes(garbage, 512, 1, guard) > garbage.stat().st_size  # a guess, still a guard
    assert guard.state == "approximate" and "GGUF header unreadable" in guard.why and guard.errors == 3
    assert sum("GGUF header unreadable" in r.getMessage() for r in caplog.records) == 1  # logged once

    def broken_reading() -> int:
        raise OSError("/proc/meminfo: permission denied")

    svc = AgentService(make_settings(), warmup=False, free_ram=broken_reading)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        assert (await c.get("/v1/status")).json()["model"]["ram_guard"]["state"] == "on"
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200  # psutil's reading stood in
        guard_status = (await c.get("/v1/status")).json()["model"]["ram_guard"]
    assert guard_status["state"] == "approximate" and guard_status["errors"] == 1
    assert "permission denied" in guard_status["why"] and "psutil" in guard_status["why"]
    await svc.models.close()
