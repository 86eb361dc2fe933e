"""Artifact serving: the controller's `GET /artifacts/{sha256}` (device-token check, FileResponse with Range) against
two plain static servers, side by side in the same run, each in its own process on loopback:

- `python -m http.server` (the simplest baseline; no Range),
- a bare Starlette app returning FileResponse (no auth, no middleware): the floor of our stack.

Client: httpx in threads. Figures: MB/s for whole downloads of one 64 MB file (4 at once, 12 in all), and requests/s
of 1 MB ranged reads (8 at once, 400 in all; http.server cannot answer them).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from nanofleet.tcp import free_port

SIZE = 64 << 20
WHOLE, WHOLE_PAR = 12, 4
RANGED, RANGED_PAR, RANGE_BYTES = 400, 8, 1 << 20


def _serve(kind: str, folder: Path, port: int) -> None:  # the server side, run as `python -m bench.bench_artifacts`
    import uvicorn

    if kind == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import FileResponse
        from starlette.routing import Route

        async def get(request: Any) -> FileResponse:
            return FileResponse(folder / request.path_params["name"])

        uvicorn.run(Starlette(routes=[Route("/{name}", get)]), host="127.0.0.1", port=port, log_level="warning")
        return
    from nanofleet.config import parse_fleet
    from nanofleet.controller.artifacts import ArtifactStore
    from nanofleet.controller.auth import ensure_operator_token
    from nanofleet.controller.store import Store
    from nanofleet.controller.web.app import create_app

    _, token_hash = ensure_operator_token(folder / "ctl")
    app = create_app(Store(folder / "ctl" / "controller.db"), parse_fleet("fleet: bench\n"),
                     operator_token_hash=token_hash, usage_db=folder / "gateway.db",
                     artifacts=ArtifactStore(folder / "ctl" / "artifacts"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _whole(url: str, headers: dict[str, str]) -> float:
    def one(_: int) -> int:
        n = 0
        with httpx.stream("GET", url, headers=headers, timeout=60) as r:
            r.raise_for_status()
            for block in r.iter_bytes(1 << 20):
                n += len(block)
        assert n == SIZE, n
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(WHOLE_PAR) as pool:
        total = sum(pool.map(one, range(WHOLE)))
    return total / (time.perf_counter() - t0) / 1e6


def _ranged(url: str, headers: dict[str, str]) -> float:
    with httpx.Client(headers=headers, timeout=60) as c:
        def one(i: int) -> None:
            start = (i * 7919 * RANGE_BYTES) % (SIZE - RANGE_BYTES)
            r = c.get(url, headers={"Range": f"bytes={start}-{start + RANGE_BYTES - 1}"})
            assert r.status_code == 206 and len(r.content) == RANGE_BYTES, r.status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(RANGED_PAR) as pool:
            list(pool.map(one, range(RANGED)))
        return RANGED / (time.perf_counter() - t0)


def _resumed(url: str, headers: dict[str, str], sha: str, folder: Path) -> float:
    """Bytes the server sent for one device's download cut at 40 % and resumed with the agent's own pull(), as a
    multiple of the model's size (1.0: nothing sent twice)."""
    from nanofleet.agent.models.download import pull
    from nanofleet.agent.models.files import part_path

    dest = folder / "device" / "model.gguf"
    dest.parent.mkdir(exist_ok=True)
    sent = 0
    with httpx.stream("GET", url, headers=headers, timeout=60) as r, open(part_path(dest), "wb") as f:
        for block in r.iter_bytes(1 << 20):
            f.write(block)
            sent += len(block)
            if sent >= 0.4 * SIZE:
                break  # the connection is cut here (the context closes it)
    answers: list[int] = []  # what each answer carried (on_size: the bytes still to come when it started)
    pull(url, dest, sha, headers=headers, on_size=answers.append)
    assert dest.stat().st_size == SIZE
    return (sent + sum(answers)) / SIZE


def run() -> dict[str, Any]:
    from nanofleet.controller.artifacts import ArtifactStore
    from nanofleet.controller.gateway.auth import issue_token

    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
        folder = Path(tmp)
        blob = folder / "model.gguf"
        with open(blob, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        sha = hashlib.sha256(blob.read_bytes()).hexdigest()
        (folder / "ctl").mkdir(mode=0o700)
        ArtifactStore(folder / "ctl" / "artifacts").add_file(blob)
        token = issue_token(folder / "gateway.db", "bench-dev", "bench")
        ports = {k: free_port() for k in ("controller", "starlette", "http.server")}
        procs = [
            subprocess.Popen([sys.executable, "-m", "bench.bench_artifacts", "controller", str(folder),
                              str(ports["controller"])]),
            subprocess.Popen([sys.executable, "-m", "bench.bench_artifacts", "starlette", str(folder),
                              str(ports["starlette"])]),
            subprocess.Popen([sys.executable, "-m", "http.server", str(ports["http.server"]), "--bind", "127.0.0.1",
                              "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        try:
            urls = {"controller": f"http://127.0.0.1:{ports['controller']}/artifacts/{sha}",
                    "starlette": f"http://127.0.0.1:{ports['starlette']}/model.gguf",
                    "http.server": f"http://127.0.0.1:{ports['http.server']}/model.gguf"}
            for url in urls.values():
                _wait(url)
            auth = {"controller": {"Authorization": f"Bearer {token}"}}
            figures: dict[str, float] = {}
            for _round in range(2):  # interleaved twice; the better round of each counts (less noise from neighbours)
                for name, url in urls.items():
                    mbs = _whole(url, auth.get(name, {}))
                    figures[f"{name}_whole_MBps"] = max(figures.get(f"{name}_whole_MBps", 0), round(mbs, 1))
                    if name != "http.server":
                        rps = _ranged(url, auth.get(name, {}))
                        figures[f"{name}_ranged_rps"] = max(figures.get(f"{name}_ranged_rps", 0), round(rps, 1))
            figures["controller_resumed_bytes_per_size"] = round(
                _resumed(urls["controller"], auth["controller"], sha, folder), 3)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    md = ("| server | whole 64 MB downloads, MB/s (4 at once) | 1 MB ranged reads, req/s (8 at once) |\n"
          "|---|---:|---:|\n"
          + "\n".join(f"| {n} | {figures[f'{n}_whole_MBps']} | {figures.get(f'{n}_ranged_rps', '— (no Range)')} |"
                      for n in urls))
    md += (f"\n\nA device's download cut at 40 % and resumed with the agent's own `pull()` against the controller: "
           f"{figures['controller_resumed_bytes_per_size']} × the model's size served in all (1.0: no byte twice).")
    return {"name": "bench_artifacts", "figures": figures, "markdown": md}


if __name__ == "__main__":
    if len(sys.argv) == 4:
        _serve(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    else:
        print(run()["markdown"])
