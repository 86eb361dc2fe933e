"""Model files against a real local HTTP server: resume after a cut connection, corrupted download rejected, no half
file under the final name, the CLI (`nanofleet model pull/list/make-test`), and lazy download with progress."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from nanofleet.agent.models.download import ChecksumMismatch, ProgressPrinter, pull
from nanofleet.agent.models.files import cache_report, list_cache, part_path
from nanofleet.agent.service import AgentService
from nanofleet.cli import main
from tests.agent.conftest import CHAT
from tests.agent.test_cancel_concurrency import until


@dataclass
class Files:
    data: bytes
    cut_after: int | None = None  # first full request: close the connection after this many bytes
    corrupt: bool = False
    delay: float = 0.0            # seconds between 16 KB blocks
    ignore_range: bool = False    # answer every request with the whole file (200), as some servers do
    ranges: list[str | None] = field(default_factory=list)


@pytest.fixture
def http_files(tiny_gguf: Path) -> Iterator[tuple[Files, str]]:
    files = Files(tiny_gguf.read_bytes())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            data = bytearray(files.data)
            if files.corrupt:
                data[1000] ^= 0xFF
            rng = self.headers.get("Range")
            files.ranges.append(rng)
            if files.ignore_range:
                rng = None
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = bytes(data[start:])
            if files.cut_after is not None and not rng:
                self.wfile.write(body[:files.cut_after])
                self.wfile.flush()
                self.close_connection = True
                files.cut_after = None
                return
            for i in range(0, len(body), 16384):
                self.wfile.write(body[i:i + 16384])
                if files.delay:
                    time.sleep(files.delay)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield files, f"http://127.0.0.1:{server.server_port}/models/tiny.gguf"
    server.shutdown()
    server.server_close()
    thread.join()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_resume_after_a_cut_connection(http_files, tmp_path: Path) -> None:
    files, url = http_files
    files.cut_after = 100_000
    seen: list[tuple[int, int | None]] = []
    dest = tmp_path / "m.gguf"
    pull(url, dest, sha(files.data), progress=lambda d, t: seen.append((d, t)), backoff=0.01)
    assert dest.read_bytes() == files.data
    assert files.ranges == [None, "bytes=100000-"]  # the second request resumed where the first was cut
    assert seen[-1] == (len(files.data), len(files.data))
    assert not part_path(dest).exists()


def test_resume_across_runs_from_a_partial_file(http_files, tmp_path: Path) -> None:
    files, url = http_files
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(files.data[:200_000])
    assert [f.partial for f in list_cache(tmp_path)] == [True]
    pull(url, dest, sha(files.data))
    assert files.ranges == ["bytes=200000-"] and dest.read_bytes() == files.data


def test_corrupted_download_is_rejected_and_deleted(http_files, tmp_path: Path) -> None:
    files, url = http_files
    files.corrupt = True
    dest = tmp_path / "m.gguf"
    with pytest.raises(ChecksumMismatch, match="sha256 mismatch"):
        pull(url, dest, sha(files.data))
    assert not dest.exists() and not part_path(dest).exists()


def test_cli_pull_list_make_test(http_files, tmp_path: Path) -> None:
    files, url = http_files
    runner = CliRunner()
    r = runner.invoke(main, ["model", "pull", url, "--sha256", sha(files.data), "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "sha256 verified" in r.output and "downloaded" in r.output  # plain progress lines off a terminal
    r = runner.invoke(main, ["model", "make-test", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "tiny-test.gguf sha256=" in r.output
    r = runner.invoke(main, ["model", "list", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "tiny-test.gguf" in r.output and "2 file(s), 918.2 KB" in r.output
    r = runner.invoke(main, ["model", "pull", url, "--sha256", "0" * 64, "--data-dir", str(tmp_path / "x")])
    assert r.exit_code == 1 and "sha256 mismatch" in r.output
    r = runner.invoke(main, ["model", "pull", url, "--sha256", "nothex", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--sha256" in r.output


def _pull_with_partial(http_files: tuple[Files, str], tmp_path: Path, have: int) -> str:
    from nanofleet.agent.models.files import cache_name

    files, url = http_files
    part = part_path(tmp_path / "models" / cache_name(url, sha(files.data)))
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(files.data[:have])
    r = CliRunner().invoke(main, ["model", "pull", url, "--sha256", sha(files.data), "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "sha256 verified" in r.output
    return r.output


def test_cli_pull_says_it_resumes_from_the_partial_file(http_files, tmp_path: Path) -> None:
    files, _ = http_files
    out = _pull_with_partial(http_files, tmp_path, 200_000)
    assert files.ranges == ["bytes=200000-"]
    assert "resuming from 195.3 KB" in out and "cannot resume" not in out


def test_cli_pull_says_when_the_server_cannot_resume(http_files, tmp_path: Path) -> None:
    files, _ = http_files
    files.ignore_range = True
    out = _pull_with_partial(http_files, tmp_path, 200_000)
    assert files.ranges == ["bytes=200000-"]  # asked, but got the whole file: said, not silent
    assert "server cannot resume (it ignored the Range request): starting again from 0" in out
    assert "resuming" not in out


def test_progress_speed_counts_only_the_bytes_of_this_download() -> None:
    import io

    out = io.StringIO()
    now = [100.0]
    p = ProgressPrinter(out, tty=False, every_s=0, clock=lambda: now[0])
    now[0] = 110.0  # ten seconds on (e.g. waiting for the server), then the resumed download starts
    p.notice(900 * 1024, True)
    now[0] = 111.0  # one second later 100 KB more are on disk: 100 KB/s, not the 1 MB already there
    p(1000 * 1024, 2000 * 1024)
    assert "resuming from 900.0 KB" in out.getvalue()
    assert "100.0 KB/s" in out.getvalue(), out.getvalue()


def test_progress_bar_on_a_terminal() -> None:
    import io

    out = io.StringIO()
    p = ProgressPrinter(out, tty=True)
    p(512 * 1024, 1024 * 1024)
    p(1024 * 1024, 1024 * 1024)
    text = out.getvalue()
    assert text.startswith("\r[") and "1.0 MB / 1.0 MB" in text and "/s ETA" in text and text.endswith("\n")
    assert cache_report(Path("/nonexistent")).startswith("0 file(s)")


async def test_lazy_download_shows_progress_in_status(http_files, make_settings, tmp_path: Path) -> None:
    files, url = http_files
    files.delay = 0.02  # ~30 blocks: long enough to watch
    svc = AgentService(make_settings(model={"source": url, "sha256": sha(files.data)}), warmup=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a", timeout=30) as c:
        assert (await c.get("/v1/status")).json()["model"]["availability"] == "downloadable"
        import asyncio

        first = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        progress: list[float] = []

        async def downloading() -> bool:
            m = (await c.get("/v1/status")).json()["model"]
            if m["availability"] == "downloading":
                progress.append(m["progress"])
            return len(progress) >= 3 and progress[-1] > 0

        deadline = asyncio.get_running_loop().time() + 10
        while not await downloading():
            assert asyncio.get_running_loop().time() < deadline, "never saw the download progress"
            await asyncio.sleep(0.01)
        r = await first
        assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
        await until(lambda: svc.models.status().availability == "available")
        assert progress == sorted(progress) and 0 < progress[-1] < 1
    await svc.models.close()


def test_download_retries_wait_by_the_one_backoff_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries after connection errors wait by nanofleet.backoff: each delay in [step/2, step) for step = base·2^k
    (equal jitter, so a fleet pulling one model at once does not retry in lockstep), then a clear error."""
    from nanofleet.agent.models import download
    from tests.conftest import free_port

    slept: list[float] = []
    monkeypatch.setattr(download.time, "sleep", slept.append)
    url = f"http://127.0.0.1:{free_port()}/models/none.gguf"  # nothing listens: connection refused
    with pytest.raises(download.DownloadError, match="gave up after 4 failed attempts"):
        pull(url, tmp_path / "m.gguf", "0" * 64, retries=3, backoff=0.01)
    assert len(slept) == 3
    for k, delay in enumerate(slept):
        step = 0.01 * 2**k
        assert step / 2 <= delay < step, (k, delay)
