"""Model updates pushed by policy, with the real tiny llama.cpp models (seeded variants: different bytes, different
sha256) served over real HTTP: download with the device token, verify, load beside, atomic switch with requests in
flight finishing on the old model, refusals for disk and RAM, rollback to the kept previous file without a download,
pruning, and an agent process killed with SIGKILL mid-download that resumes from where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nanofleet.agent.runtime.base import ChatRequest
from nanofleet.agent.runtime.lifecycle import ModelManager
from nanofleet.agent.runtime.model_update import ModelUpdater
from nanofleet.agent.service import AgentService, artifact_auth
from nanofleet.agent.tiny_model import make_tiny_gguf
from nanofleet.config import ModelSpec
from nanofleet.protos import fleet_pb2
from tests.agent.artifact_server import ArtifactServer
from tests.conftest import until, wait_for

HI = ChatRequest([{"role": "user", "content": "hi"}], max_tokens=2)
TOKEN = "nft_device_token"


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three tiny models in an artifact folder, by name -> sha256."""
    folder = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        tmp = folder / f"{name}.tmp"
        make_tiny_gguf(tmp, seed=seed)
        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.rename(folder / sha)
        out[name] = sha
    out["folder"] = str(folder)
    return out


@pytest.fixture
def server(variants: dict[str, str]) -> Iterator[ArtifactServer]:
    s = ArtifactServer(Path(variants["folder"]), token=TOKEN)
    yield s
    s.close()


def _spec(server: ArtifactServer, sha: str, **kw: object) -> ModelSpec:
    return ModelSpec(source=server.url(sha), sha256=sha, n_ctx=256, keep_alive=-1, **kw)  # type: ignore[arg-type]


def _manager(tmp_path: Path, tiny_gguf: Path, **kw: object) -> ModelManager:
    return ModelManager(ModelSpec(source=f"file:{tiny_gguf}", n_ctx=256, keep_alive=-1), tmp_path / "cache",
                        tmp_path / "private", download_headers=lambda url, sha: artifact_auth(TOKEN, url, sha),
                        **kw)  # type: ignore[arg-type]


def test_the_token_goes_only_to_an_artifact_url_of_the_expected_sha() -> None:
    sha = "a" * 64
    assert artifact_auth("t", f"https://ctl:8080/artifacts/{sha}", sha) == {"Authorization": "Bearer t"}
    assert artifact_auth("t", "https://huggingface.co/x/resolve/main/m.gguf", sha) is None
    assert artifact_auth("t", f"https://ctl/artifacts/{'b' * 64}", sha) is None
    assert artifact_auth(None, f"https://ctl/artifacts/{sha}", sha) is None


async def test_switch_is_atomic_requests_in_flight_finish_on_the_old_model(
        tmp_path: Path, tiny_gguf: Path, server: ArtifactServer, variants: dict[str, str]) -> None:
    m = _manager(tmp_path, tiny_gguf)
    up = ModelUpdater(m)
    async with m.use() as old_backend:
        await old_backend.generate(HI)
        outcome = await up.apply(_spec(server, variants["a"]))  # while a request holds the old model
        assert outcome == "applied" and up.state == "applied" and up.reason == ""
        assert m.loaded and m.spec.sha256 == variants["a"] and up.previous_sha256 == ""
        assert (await old_backend.generate(HI)).usage.completion_tokens == 2  # the old one still answers
        async with m.use() as new_backend:
            assert new_backend is not old_backend
            await new_backend.generate(HI)
    await m.settle()
    assert m.stats.requests == 1 and m.stats.errors == 0 and m.stats.p95_latency_ms > 0  # the new model's own
    assert [s.start for s in server.log] == [0]
    await m.close()


async def test_refusals_keep_the_old_model_serving_with_the_reason(
        tmp_path: Path, tiny_gguf: Path, server: ArtifactServer, variants: dict[str, str]) -> None:
    m = _manager(tmp_path, tiny_gguf)
    up = ModelUpdater(m, disk_free=lambda path: 10 << 20, disk_reserve=64 << 20)
    assert await up.apply(_spec(server, variants["a"])) == "failed"
    assert up.reason.startswith("insufficient_disk: the model needs") and "free in" in up.reason
    assert not list((tmp_path / "cache").iterdir())  # refused before a byte was written
    assert m.spec.source == f"file:{tiny_gguf}"
    up.disk_free = lambda path: 1 << 40
    m.free_ram = lambda: 1 << 20  # 1 MB free and nothing loaded to make room: refused
    assert await up.apply(_spec(server, variants["a"])) == "failed"
    assert up.reason.startswith("insufficient_ram: model needs about") and up.state == "failed"
    assert m.spec.source == f"file:{tiny_gguf}"  # still the old one
    m.free_ram = lambda: 1 << 40
    liar = "d" * 64  # a file whose bytes are not the ones its name promises
    (server.folder / liar).write_bytes((server.folder / variants["c"]).read_bytes())
    bad = ModelSpec(source=server.url(liar), sha256=liar, n_ctx=256)
    assert await up.apply(bad) == "failed" and up.reason.startswith("download: ") and "sha256 mismatch" in up.reason
    wrong = ArtifactServer(server.folder, token="nft_other")
    try:
        assert await up.apply(_spec(wrong, variants["b"])) == "failed"
        assert "HTTP 401" in up.reason and "unknown device token" in up.reason
    finally:
        wrong.close()
    assert up.counts["failed"] == 4
    async with m.use() as old:  # loaded; RAM for one model only: the old one goes first, then the new loads
        pass
    m.free_ram = lambda: 1 << 20
    assert await up.apply(_spec(server, variants["a"])) == "applied"
    await m.settle()
    assert m.loaded and m.spec.sha256 == variants["a"] and old is not None
    await m.close()


async def test_rollback_uses_the_kept_file_and_older_models_are_pruned(
        tmp_path: Path, tiny_gguf: Path, server: ArtifactServer, variants: dict[str, str]) -> None:
    m = _manager(tmp_path, tiny_gguf)
    up = ModelUpdater(m)
    a, b, c = (_spec(server, variants[k]) for k in "abc")
    assert await up.apply(a) == "applied"
    assert await up.apply(b) == "applied" and up.previous_sha256 == variants["a"]
    fetched = len(server.log)
    assert await up.apply(a) == "applied"  # the rollback: a's file was kept
    assert len(server.log) == fetched and up.previous_sha256 == variants["b"]
    assert await up.apply(a) == "unchanged"
    assert await up.apply(c) == "applied"
    names = sorted(p.name[:12] for p in (tmp_path / "cache").glob("*.gguf"))
    assert names == sorted([variants["a"][:12], variants["c"][:12]])  # b is neither serving nor previous: gone
    await m.close()


async def test_the_agent_reports_the_update_in_status_and_telemetry(
        make_settings, server: ArtifactServer, variants: dict[str, str]) -> None:
    svc = AgentService(make_settings(gateway_token=TOKEN), warmup=False)
    try:
        policy = fleet_pb2.RoutingPolicy(fleet="demo", device_id="dev-test", version=2, prefer="local",
                                         model_source=server.url(variants["b"]), model_sha256=variants["b"])
        await svc.apply_policy(policy)
        await svc.apply_policy(policy)  # the same model again while it runs: one update, not two
        assert svc.updater is not None
        await until(lambda: svc.updater.state == "applied", what="the update")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "max_tokens": 2})
            assert r.status_code == 200
            st = (await c.get("/v1/status")).json()["model_update"]
        assert st["state"] == "applied" and st["serving_sha256"] == variants["b"] and st["requests"] == 1
        ms = svc.model_state()
        assert (ms.update_state, ms.update_sha256, ms.sha256, ms.requests, ms.errors) == \
            ("applied", variants["b"], variants["b"], 1, 0)
        assert len(server.log) == 1
    finally:
        await svc.models.close()


def test_an_agent_killed_mid_download_resumes_and_verifies(
        tmp_path: Path, tiny_gguf: Path, server: ArtifactServer, variants: dict[str, str]) -> None:
    """SIGKILL while the policy's model downloads; the restarted agent takes the stored policy, resumes from the
    partial file (a Range request past zero) and serves the verified model."""
    sha = variants["c"]
    size = (server.folder / sha).stat().st_size
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "policy.json").write_text(json.dumps({
        "fleet": "demo", "deviceId": "kill-1", "version": 5, "prefer": "local",
        "modelSource": server.url(sha), "modelSha256": sha}))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device_id: kill-1\nfleet: demo\ndata_dir: {data}\nbroker_url: null\ngateway_token: {TOKEN}\n"
                   f"model: {{source: 'file:{tiny_gguf}', n_ctx: 256}}\n")
    sock = tmp_path / "run" / "a.sock"
    server.delay_s = 0.05  # ~320 KB/s: the tiny model takes seconds
    part = data / "models" / f".{sha[:12]}-{sha}.gguf.part"

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "nanofleet", "agent", "--config", str(cfg), "--socket",
                                 str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = start()
    try:
        wait_for(lambda: part.exists() and part.stat().st_size > 32768, timeout=60, what="a partial download")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        cut = part.stat().st_size
        assert 0 < cut < size
        server.delay_s = 0
        proc = start()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=30) as c:
            def applied() -> bool:
                try:
                    return c.get("/v1/status").json()["model_update"]["state"] == "applied"
                except (httpx.TransportError, ValueError, KeyError, TypeError):
                    return False

            wait_for(applied, timeout=60, what="the resumed update to apply")
            assert c.get("/v1/status").json()["model_update"]["serving_sha256"] == sha
        assert server.log[-1].start >= cut > 0  # resumed, not restarted from zero
        assert sum(s.sent for s in server.log) < 2 * size
        assert (data / "models" / f"{sha[:12]}-{sha}.gguf").read_bytes() == (server.folder / sha).read_bytes()
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


async def test_stopping_the_agent_mid_download_stops_the_download(
        make_settings, server: ArtifactServer, variants: dict[str, str]) -> None:
    """The download runs in a worker thread: stopping the agent must end it too (the partial file stays for the
    next start), not leave it fetching until the model is whole."""
    sha = variants["b"]
    server.delay_s = 0.1  # ~160 KB/s: seconds for the tiny model
    svc = AgentService(make_settings(gateway_token=TOKEN), warmup=False)
    await svc.start()
    part = svc.settings.cache_dir / f".{sha[:12]}-{sha}.gguf.part"
    try:
        await svc.apply_policy(fleet_pb2.RoutingPolicy(fleet="demo", device_id="dev-test", version=2, prefer="local",
                                                       model_source=server.url(sha), model_sha256=sha))
        await until(lambda: part.exists() and part.stat().st_size > 0, what="the download under way")
    finally:
        await svc.stop()
    await until(lambda: server.log[-1].closed, what="the server to see the download go away")
    assert server.log[-1].sent < (server.folder / sha).stat().st_size  # it went away before the end
    assert part.exists() and not svc.models.spec.sha256
