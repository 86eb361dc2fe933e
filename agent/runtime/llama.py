"""llama.cpp in-process through xllamacpp: the local model backend.

xllamacpp's `Server` runs llama.cpp's server loop (slots, continuous batching, prompt cache) in our process and also
opens llama.cpp's own HTTP listener; we bind that listener to a unix socket inside the agent's private 0700 folder
(FIELD.md), so nothing reaches the model around the router. Generation releases the GIL, so calls run on worker
threads; a streaming callback that returns True cancels the task inside llama.cpp at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nanofleet.agent.runtime.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    BadRequest,
    ChatRequest,
    Chunk,
    Completion,
    ContextOverflow,
    Usage,
)

log = logging.getLogger("nanofleet.agent.llama")

_END = object()
_serial = itertools.count(1)
_MAX_UDS_PATH = 100  # sun_path is 108 bytes on Linux, keep a margin


def private_socket_path(private_dir: Path) -> Path:
    """Where llama.cpp's own listener goes: in `private_dir` (0700) if the path is short enough for AF_UNIX."""
    private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(private_dir, 0o700)
    path = private_dir / f"llm-{os.getpid()}-{next(_serial)}.sock"  # unique: an old model may still be closing
    if len(os.fsencode(path)) <= _MAX_UDS_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="nanofleet-llm-")) / "llm.sock"  # mkdtemp makes it 0700


class LlamaBackend(Backend):
    """One loaded GGUF model; `n_parallel` slots, each with `n_ctx` tokens of context."""

    name = "local"

    def __init__(
        self, model_path: Path, *, model_name: str, private_dir: Path, n_ctx: int = 2048, n_parallel: int = 2,
        threads: int | None = None,
    ) -> None:
        import xllamacpp

        self.model_name = model_name
        self.context_window = n_ctx
        self.n_parallel = n_parallel
        self.socket_path = private_socket_path(private_dir)
        self.tokens_generated = 0  # content chunks produced by llama.cpp while streaming (cancellation tests)
        self.active_streams = 0
        self._cancels: set[threading.Event] = set()
        self.socket_path.unlink(missing_ok=True)  # a stale one from a crash would make the bind fail
        params = xllamacpp.CommonParams()
        params.model.path = str(model_path)
        params.n_ctx = n_ctx * n_parallel  # llama.cpp splits n_ctx across slots
        params.n_parallel = n_parallel
        params.cache_prompt = True
        params.hostnames = [str(self.socket_path)]
        params.verbosity = -1
        # No busy-waiting between graphs: on a 2-4 core device a spinning threadpool burns battery and steals the
        # CPU from everything else (the API, telemetry); measured here: no loss in latency or tokens/s.
        params.cpuparams.poll = 0
        params.cpuparams_batch.poll = 0
        if threads:
            params.cpuparams.n_threads = threads
            params.cpuparams_batch.n_threads = threads
        try:
            self._server: Any = xllamacpp.Server(params)
        except RuntimeError as exc:
            self.socket_path.unlink(missing_ok=True)
            raise BackendUnavailable(f"llama.cpp could not load {model_path}: {exc}") from exc
        os.chmod(self.socket_path, 0o600)
        self._executor = ThreadPoolExecutor(max_workers=n_parallel + 2, thread_name_prefix="llama")
        self._http: Any = None

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": request.messages, "cache_prompt": True}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.top_k is not None:
            body["top_k"] = request.top_k
        if request.stop:
            body["stop"] = request.stop
        if request.options:
            body.update(request.options)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, request: ChatRequest) -> Completion:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._server.handle_chat_completions,
                                            self._body(request, False))
        if "error" in result:
            raise _error(result["error"])
        choice = result["choices"][0]
        return Completion(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            usage=_usage(result.get("usage")),
            model=self.model_name,
            tokens_per_s=float(result.get("timings", {}).get("predicted_per_second", 0.0)),
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        body = self._body(request, True)

        def put(item: Any) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: stop generating
                cancel.set()
            return cancel.is_set()

        def on_chunk(chunk: dict[str, Any]) -> bool:
            if cancel.is_set():
                return True
            choices = chunk.get("choices")
            if choices and choices[0].get("delta", {}).get("content"):
                self.tokens_generated += 1
            return put(chunk)

        def run() -> None:
            try:
                self._server.handle_chat_completions(body, on_chunk)
            except BaseException as exc:  # noqa: BLE001 - not swallowed: raised again by the awaiting stream
                put(exc)
            finally:
                put(_END)

        self._cancels.add(cancel)
        self.active_streams += 1
        loop.run_in_executor(self._executor, run)
        finish: str | None = None
        tps = 0.0
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    if finish is not None:
                        yield Chunk("", finish, None, self.model_name)
                    return
                if isinstance(item, BaseException):
                    raise BackendUnavailable(f"llama.cpp failed: {item}") from item
                if "error" in item:
                    raise _error(item["error"])
                if "usage" in item:
                    tps = float(item.get("timings", {}).get("predicted_per_second", 0.0))
                    yield Chunk("", finish or "stop", _usage(item["usage"]), self.model_name, tps)
                    finish = None
                    continue
                choices = item.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                text = choice.get("delta", {}).get("content")
                if text:
                    yield Chunk(text, None, None, self.model_name)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        finally:
            cancel.set()
            self._cancels.discard(cancel)
            self.active_streams -= 1

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the templated conversation, asked of llama.cpp's own listener on its private socket."""
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path)),
                                           base_url="http://llama", timeout=30)
        try:
            r = await self._http.post("/apply-template", json={"messages": messages})
            r.raise_for_status()
            r = await self._http.post("/tokenize", json={"content": r.json()["prompt"], "add_special": True})
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"llama.cpp tokenizer failed: {exc}") from exc
        return len(r.json()["tokens"])

    async def _listener_running(self, within: float = 5.0) -> bool:
        """Whether llama.cpp's HTTP listener thread has entered its accept loop (one answered request proves it).

        Why: xllamacpp's `~Server` stops that listener and joins its thread while holding the GIL. A stop that comes
        before the thread started listening (a model closed right after it loaded, e.g. a failed warm-up) is lost,
        the thread then blocks in accept() for good, and the join hangs the whole agent — seen in this suite
        (py-spy: `~Server` in `std::thread::join`, every other thread waiting for the GIL)."""
        import httpx

        deadline = time.monotonic() + within
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path)),
                                     base_url="http://llama", timeout=1.0) as client:
            while True:
                try:
                    await client.get("/health")
                    return True
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        return False
                    await asyncio.sleep(0.01)

    async def close(self) -> None:
        for cancel in list(self._cancels):
            cancel.set()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._server is not None and not await self._listener_running():
            log.error("llama.cpp's listener on %s never answered: closing the model may hang (xllamacpp joins "
                      "that thread); the agent's supervisor restarts it if so", self.socket_path)
        if self._server is not None:
            holder = [self._server]  # the last reference is dropped on a worker thread: the destructor joins
            self._server = None      # llama.cpp's loop thread, which must not block the event loop
            await asyncio.get_running_loop().run_in_executor(self._executor, holder.clear)
            self._executor.shutdown(wait=False)
        self.socket_path.unlink(missing_ok=True)


def _usage(raw: dict[str, Any] | None) -> Usage:
    raw = raw or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens", 0)),
        completion_tokens=int(raw.get("completion_tokens", 0)),
        cached_tokens=int((raw.get("prompt_tokens_details") or {}).get("cached_tokens", 0)),
    )


def _error(err: dict[str, Any]) -> BackendError:
    message = str(err.get("message", "llama.cpp error"))
    if err.get("type") == "exceed_context_size_error":
        return ContextOverflow(message, param="messages")
    if int(err.get("code", 500)) == 400:
        return BadRequest(message)
    return BackendUnavailable(f"llama.cpp: {message}")
