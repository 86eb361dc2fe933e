"""The controller's artifact store and its HTTP face, for real: files on disk (modes, atomic names), uvicorn on a
loopback port, device tokens in a real gateway db, Range answers read back with httpx and with the agent's own
resumable `pull`."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from nanofleet.agent.models.download import DownloadError, pull
from nanofleet.cli import main
from nanofleet.config import parse_fleet
from nanofleet.controller.artifacts import ArtifactNotFound, ArtifactRefused, ArtifactStore
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.gateway.auth import issue_token, revoke_token
from nanofleet.controller.store import Store
from nanofleet.controller.web.app import create_app
from nanofleet.tcp import free_port
from tests.conftest import wait_for


@dataclass
class Served:
    url: str
    store: ArtifactStore
    operator: str
    device_token: str
    gateway_db: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    data = tmp_path / "ctl"
    store = Store(data / "controller.db")
    gw = tmp_path / "gateway" / "gateway.db"
    gw.parent.mkdir()
    device_token = issue_token(gw, "pi-1", "demo")
    issue_token(gw, "other-fleet-dev", "elsewhere")
    token, token_hash = ensure_operator_token(data)
    assert token is not None
    arts = ArtifactStore(data / "artifacts")
    app = create_app(store, parse_fleet("fleet: demo\n"), operator_token_hash=token_hash, usage_db=gw,
                     artifacts=arts)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="artifacts-uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="uvicorn to start")
    try:
        yield Served(f"http://127.0.0.1:{port}", arts, token, device_token, gw)
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def _blob(tmp_path: Path, size: int = 300_000, name: str = "model.gguf") -> tuple[Path, bytes, str]:
    data = os.urandom(size)
    p = tmp_path / name
    p.write_bytes(data)
    return p, data, hashlib.sha256(data).hexdigest()


def test_store_names_files_by_sha256_private_and_finds_them_by_name_or_prefix(tmp_path: Path) -> None:
    arts = ArtifactStore(tmp_path / "artifacts")
    src, data, sha = _blob(tmp_path)
    art = arts.add_file(src, "gemma-test")
    assert (art.sha256, art.name, art.size) == (sha, "gemma-test", len(data))
    assert (tmp_path / "artifacts" / sha).read_bytes() == data
    assert (tmp_path / "artifacts").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "artifacts" / sha).stat().st_mode & 0o777 == 0o600
    assert not [p for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".")]  # no temp file left
    assert arts.get("gemma-test") == art == arts.get(sha[:8]) == arts.get(sha.upper()[:0] + sha)
    assert arts.add_file(src, "renamed").sha256 == sha and [a.name for a in arts.list()] == ["renamed"]
    other, _, sha2 = _blob(tmp_path, 1000, "b.gguf")
    arts.add_file(other, "renamed")
    with pytest.raises(ArtifactRefused, match="names 2 artifacts"):
        arts.get("renamed")
    with pytest.raises(ArtifactNotFound, match="no artifact named 'nope'"):
        arts.get("nope")
    with pytest.raises(ArtifactRefused, match=r"^sha256: expected 64 hex digits"):
        arts.path("xyz")
    with pytest.raises(ArtifactRefused, match=r"^name: "):
        arts.add_file(src, "../evil")
    with pytest.raises(ArtifactRefused, match=r"^FILE: .* is not a readable file"):
        arts.add_file(tmp_path / "missing")
    assert arts.remove(sha2).sha256 == sha2 and [a.sha256 for a in arts.list()] == [sha]
    (tmp_path / "artifacts" / f"{sha}.json").write_text("{not json")  # bytes without readable metadata still count
    assert arts.get(sha).name == sha[:12]


def test_devices_fetch_with_their_token_and_range(served: Served, tmp_path: Path) -> None:
    src, data, sha = _blob(tmp_path)
    served.store.add_file(src)
    auth = {"Authorization": f"Bearer {served.device_token}"}
    with httpx.Client(base_url=served.url, timeout=10) as c:
        r = c.get(f"/artifacts/{sha}", headers=auth)
        assert r.status_code == 200 and r.content == data and r.headers["etag"] == f'"{sha}"'
        assert r.headers["accept-ranges"] == "bytes"
        r = c.get(f"/artifacts/{sha}", headers={**auth, "Range": "bytes=1000-"})
        assert r.status_code == 206 and r.content == data[1000:]
        assert r.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        r = c.get(f"/artifacts/{sha}", headers={**auth, "Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        r = c.get(f"/artifacts/{sha}", headers={**auth, "Range": f"bytes={len(data) + 5}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
        r = c.head(f"/artifacts/{sha}", headers=auth)
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(data) and not r.content
        r = c.get(f"/artifacts/{sha}", headers={"Authorization": f"Bearer {served.operator}"})
        assert r.status_code == 200  # the operator may check a file by hand
        # refusals: JSON (never the login redirect), counted
        r = c.get(f"/artifacts/{sha}")
        assert r.status_code == 401 and r.json()["error"] == "missing_token"
        r = c.get(f"/artifacts/{sha}", headers={"Authorization": "Bearer nft_wrong"})
        assert r.status_code == 401 and r.json()["detail"] == "unknown device token"
        r = c.get(f"/artifacts/{'0' * 64}", headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "artifact_not_found"
        r = c.get("/artifacts/not-a-sha", headers=auth)
        assert r.status_code == 422 and "sha256" in r.json()["detail"]
        revoke_token(served.gateway_db, "pi-1")
        fresh = issue_token(served.gateway_db, "pi-1", "demo")  # the old token is revoked by the new one too
        r = c.get(f"/artifacts/{sha}", headers={"Authorization": f"Bearer {fresh}"})
        assert r.status_code == 200
        other = issue_token(served.gateway_db, "x-1", "elsewhere")
        r = c.get(f"/artifacts/{sha}", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 401 and "belongs to fleet 'elsewhere'" in r.json()["detail"]


def test_the_agents_pull_resumes_from_the_controller_and_verifies(served: Served, tmp_path: Path) -> None:
    src, data, sha = _blob(tmp_path, 500_000)
    served.store.add_file(src)
    dest = tmp_path / "dev" / "m.gguf"
    dest.parent.mkdir()
    part = dest.with_name(f".{dest.name}.part")
    part.write_bytes(data[:123_456])  # what a device killed mid-download leaves
    seen: list[int] = []
    pull(f"{served.url}/artifacts/{sha}", dest, sha, headers={"Authorization": f"Bearer {served.device_token}"},
         progress=lambda done, total: seen.append(done))
    assert dest.read_bytes() == data and not part.exists()
    assert seen[0] > 123_456 and seen[-1] == len(data)  # resumed: the first progress is past what was on disk
    with pytest.raises(DownloadError, match=r"HTTP 401.*unknown device token"):
        pull(f"{served.url}/artifacts/{sha}", tmp_path / "dev" / "n.gguf", sha,
             headers={"Authorization": "Bearer nft_bad"})


def test_cli_adds_lists_and_removes_and_refuses_a_missing_state_dir(tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    Store(data / "controller.db").close()
    src, _, sha = _blob(tmp_path)
    run = CliRunner().invoke
    r = run(main, ["artifacts", "add", str(src), "--name", "tiny", "--data-dir", str(data)])
    assert r.exit_code == 0 and r.output.startswith(sha)
    r = run(main, ["artifacts", "list", "--data-dir", str(data)])
    assert r.exit_code == 0 and sha in r.output and "tiny" in r.output
    r = run(main, ["artifacts", "add", "https://example.invalid/x.gguf", "--data-dir", str(data)])
    assert r.exit_code == 2 and "--sha256 is required" in r.output
    r = run(main, ["artifacts", "add", str(tmp_path / "nope"), "--data-dir", str(data)])
    assert r.exit_code == 1 and "is not a readable file" in r.output
    r = run(main, ["artifacts", "rm", "tiny", "--data-dir", str(data)])
    assert r.exit_code == 0 and f"removed {sha}" in r.output
    r = run(main, ["artifacts", "rm", "tiny", "--data-dir", str(data)])
    assert r.exit_code == 1 and "no artifact named 'tiny'" in r.output
    r = run(main, ["artifacts", "list", "--data-dir", str(tmp_path / "elsewhere")])
    assert r.exit_code == 1 and "--data-dir: no controller state" in r.output
    assert not (tmp_path / "elsewhere").exists()


def test_cli_with_a_postgresql_store_keeps_artifacts_in_the_data_folder(tmp_path: Path, pg_url: str) -> None:
    """With --store postgresql://… there is no controller.db: the data folder itself says a controller lives there."""
    data = tmp_path / "ctl"
    src, _, sha = _blob(tmp_path)
    run = CliRunner().invoke
    r = run(main, ["artifacts", "list", "--data-dir", str(data), "--store", pg_url])
    assert r.exit_code == 1 and "no controller state in" in r.output and "(no such folder)" in r.output
    assert not data.exists()
    data.mkdir()
    r = run(main, ["artifacts", "add", str(src), "--name", "tiny", "--data-dir", str(data), "--store", pg_url])
    assert r.exit_code == 0 and r.output.startswith(sha) and not (data / "controller.db").exists()
    assert sha in run(main, ["artifacts", "list", "--data-dir", str(data), "--store", pg_url]).output


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_add_from_a_url_verifies_the_download(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _, data, sha = _blob(site, 70_000, "m.gguf")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.gguf"
        arts = ArtifactStore(tmp_path / "artifacts")
        art = arts.add_url(url, sha)
        assert art.name == "m.gguf" and arts.path(sha).read_bytes() == data
        assert arts.path(sha).stat().st_mode & 0o777 == 0o600
        with pytest.raises(Exception, match="sha256 mismatch"):
            arts.add_url(url, "a" * 64)
        assert not (tmp_path / "artifacts" / ("a" * 64)).exists()
    finally:
        server.shutdown()
        thread.join(5)
