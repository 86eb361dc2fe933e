"""A controller-like artifact server for agent tests: files by sha256 at /artifacts/<sha256>, Range `bytes=N-`,
a device token checked, an optional pause per 16 KB (to kill an agent mid-download), and a log of what it sent."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Served:
    start: int
    sent: int = 0
    closed: bool = False  # the answer ended: all sent, or the client went away


@dataclass
class ArtifactServer:
    folder: Path
    token: str = "nft_test"
    delay_s: float = 0.0
    log: list[Served] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.headers.get("authorization") != f"Bearer {outer.token}":
                    self.send_error(401, "unknown device token")
                    return
                path = outer.folder / self.path.rsplit("/", 1)[-1]
                if not self.path.startswith("/artifacts/") or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(self.headers.get("range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("content-range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("content-range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("content-length", str(len(data) - start))
                self.end_headers()
                served = Served(start)
                outer.log.append(served)
                try:
                    for i in range(start, len(data), 16384):
                        try:
                            self.wfile.write(data[i:i + 16384])
                            self.wfile.flush()
                        except OSError:
                            return
                        served.sent += len(data[i:i + 16384])
                        if outer.delay_s:
                            threading.Event().wait(outer.delay_s)
                finally:
                    served.closed = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, sha: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/artifacts/{sha}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
