"""paho-mqtt 2.x behind an async face, shared by the agent, the controller and the simulator.

paho runs its own network thread (`loop_start`); its callbacks only hand events to the asyncio loop
(`call_soon_threadsafe`) or to a caller-supplied `sink(paho_message)` that must be cheap and never publish
(publishing or `wait_for_publish()` inside a paho callback can deadlock: paho #354, #527, #531). Reconnects wait
nanofleet.backoff's delay; the last will can be recomputed before every connection attempt (Sparkplug's bdSeq).

Nothing fails silently: an exception in a callback (ours or the caller's `sink` and hooks) would end paho's network
thread, so each is caught, logged and counted in `failures` by kind (`sink`, `hook`, `callback`, `publish`,
`connect`) and kept in `last_error`; a publish that paho refuses is counted and logged, and the futures of
publishes still unacknowledged when the client stops fail with MqttNotConnected.

Exceptions: MqttError (root) ← MqttUrlError, MqttNotConnected, MqttPublishError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from nanofleet.backoff import Backoff

__all__ = ["Message", "MqttClient", "MqttError", "MqttNotConnected", "MqttPublishError", "MqttUrlError", "Will",
           "check_ca", "parse_broker_url"]

log = logging.getLogger(__name__)


class MqttError(Exception):
    """Root of nanofleet's MQTT errors."""


class MqttUrlError(MqttError):
    """A broker URL that is not mqtt://host[:port] or mqtts://host[:port] (or a CA file given for mqtt://)."""


class MqttNotConnected(MqttError):
    """A QoS 0 publish while the client is not connected (QoS 1 is queued by paho instead)."""


class MqttPublishError(MqttError):
    """paho refused a publish (e.g. its queue is full)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    conn: int = 0  # which connection (MqttClient.connects at arrival) delivered it


class Publisher(Protocol):
    """The publishing side the controller's policy and command code need: MqttClient, or the controller's own
    reader's AsyncPublisher (controller/mqtt_reader.py)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes | str, qos: int = 0,
                retain: bool = False) -> asyncio.Future[None]: ...

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool: ...


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) from mqtt://host[:port] or mqtts://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise MqttUrlError(f"broker url {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise MqttUrlError(f"broker url {url!r}: bad port") from exc
    return parts.hostname, port, tls


def check_ca(url: str, tls: bool, ca: str | Path | None) -> None:
    """A CA file only means something for mqtts://, and must be readable: say so before connecting."""
    if ca is None:
        return
    if not tls:
        raise MqttUrlError(f"broker url {url!r}: a CA file ({ca}) needs an mqtts:// url")
    if not Path(ca).is_file():
        raise MqttUrlError(f"broker CA file {str(ca)!r} does not exist")


WillSource = Will | Callable[[], Will | None] | None
ConnectHook = Callable[[bool], Awaitable[None] | None]  # argument: session_present


class MqttClient:
    """One MQTT connection. `start()` returns at once: the connection (and every reconnect) happens in the
    background; `connected` tells whether it is up and `wait_connected()` waits for it."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "",
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        will: WillSource = None,
        backoff: tuple[float, float] = (0.2, 10.0),
        sink: Callable[[paho.MQTTMessage], None] | None = None,
        on_connect: ConnectHook | None = None,
        on_disconnect: Callable[[], Awaitable[None] | None] | None = None,
        max_inflight: int = 100,
        max_queued: int = 10_000,
        ca: str | Path | None = None,
    ) -> None:
        self.host, self.port, tls = parse_broker_url(url)
        check_ca(url, tls, ca)
        self.url = url
        self._will = will
        self._backoff = Backoff(*backoff)
        self._sink = sink
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        self._keepalive = keepalive
        self._filters: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._connected = threading.Event()
        self._connected_async: asyncio.Event | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._early: set[int] = set()
        self._unawaited: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_error: str | None = None
        self.failures: collections.Counter[str] = collections.Counter()
        self.connects = 0
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                        protocol=paho.MQTTv311)
        if username is not None:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(ca_certs=str(ca) if ca is not None else None)  # None: the system's CA store
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(max_queued)
        c.on_connect = self._guarded(self._cb_connect)
        c.on_connect_fail = self._guarded(self._cb_connect_fail)
        c.on_disconnect = self._guarded(self._cb_disconnect)
        c.on_message = self._cb_message  # guards the caller's sink itself (the hot path: one try, no wrapper)
        c.on_publish = self._guarded(self._cb_publish)
        self._client = c

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> MqttClient:
        self._loop = asyncio.get_running_loop()
        self._connected_async = asyncio.Event()
        self._arm_backoff_and_will()
        self._client.connect_async(self.host, self.port, self._keepalive)
        self._client.loop_start()
        return self

    async def wait_connected(self, within: float | None = None) -> None:
        """Wait until connected; TimeoutError after `within` seconds."""
        assert self._connected_async is not None, "start() first"
        await asyncio.wait_for(self._connected_async.wait(), within)

    async def stop(self, grace: float = 5.0) -> None:
        """Disconnect cleanly (the broker does not publish the last will) and stop the network thread."""
        if self._loop is None:
            return
        self._client.disconnect()
        await asyncio.wait_for(asyncio.to_thread(self._client.loop_stop), grace)
        self._connected.clear()
        self._fail_pending()
        for task in list(self._tasks):
            task.cancel()
        self._loop = None

    async def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash or a cut cable would: the broker fires the will."""
        if self._loop is None:
            return
        self._client._thread_terminate = True  # stop paho reconnecting; there is no public switch for it
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        await asyncio.to_thread(self._client.loop_stop)
        self._connected.clear()
        self._fail_pending()
        self._loop = None

    def drop(self) -> None:
        """Cut the TCP connection without DISCONNECT but keep reconnecting (a flaky network): the will fires."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def __aenter__(self) -> MqttClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- subscribe / publish / receive -------------------------------------------------------------------------
    def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Remember the filters (re-subscribed on every connect) and subscribe now if connected."""
        new = [(f, q) for f, q in filters if self._filters.get(f) != q]
        self._filters.update(dict(filters))
        if new and self.connected:
            self._client.subscribe(new)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> asyncio.Future[None]:
        """Queue a message; the future completes when it was written (QoS 0) or acknowledged (QoS 1).
        Call from the event loop's thread (acks are matched there, so no lock is shared with paho's)."""
        assert self._loop is not None, "start() first"
        fut: asyncio.Future[None] = self._loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise MqttNotConnected(f"not connected to {self.url}")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttPublishError(f"publish to {topic} refused: {paho.error_string(info.rc)}")
        if info.mid in self._early:
            self._early.discard(info.mid)
            fut.set_result(None)
        else:
            self._pending[info.mid] = fut
        return fut

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Fire and forget (hot paths): True if paho took it — written, or (QoS 1) queued for the next
        connection, which paho sends then. False: not taken (counted and logged). Call from the loop's thread."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        taken = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN)
        if not taken:
            self._failed("publish", f"publish to {topic} refused: {paho.error_string(info.rc)}")
            return False
        if info.mid in self._early:
            self._early.discard(info.mid)
        else:
            self._unawaited.add(info.mid)
        return True

    async def messages(self) -> AsyncIterator[Message]:
        """Messages of the subscribed filters, in arrival order (unless a `sink` takes them)."""
        while True:
            yield await self._queue.get()

    # -- paho callbacks (network thread: hand over, never publish) ---------------------------------------------
    def _failed(self, kind: str, error: str, exc: BaseException | None = None) -> None:
        """Count, keep and log a failure; per-message kinds (sink, publish) log the first and every 1000th."""
        self.failures[kind] += 1
        self.last_error = f"{kind}: {error}"
        n = self.failures[kind]
        if kind not in ("sink", "publish") or n == 1 or n % 1000 == 0:
            log.error("mqtt %s: %s (%d so far)", self.url, self.last_error, n, exc_info=exc)

    def _guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        """A paho callback that cannot end paho's network thread: its failure is logged and counted."""

        def call(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 — counted and logged with its traceback by _failed
                self._failed("callback", f"{fn.__name__}: {exc!r}", exc)

        return call

    def _arm_backoff_and_will(self) -> None:
        # paho waits exactly this long before its next attempt: reconnect_delay_set resets its own doubling
        # paho annotates these int but takes seconds as floats (it only adds and compares them)
        self._client.reconnect_delay_set(max(self._backoff.next(), 0.01), self._backoff.cap)  # type: ignore[arg-type]
        will = self._will() if callable(self._will) else self._will
        self._client.will_clear()
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.last_error = f"connection refused: {rc}"
            log.warning("mqtt %s: %s", self.url, self.last_error)
            return
        self._backoff.reset()
        self.connects += 1
        self.last_error = None
        if self._filters:
            client.subscribe(list(self._filters.items()))
        self._connected.set()
        self._call_soon(self._on_connected, bool(flags.session_present))

    def _cb_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self.failures["connect"] += 1  # every retry counted; logged by whoever watches `connected`
        self.last_error = "broker unreachable"
        self._arm_backoff_and_will()

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._arm_backoff_and_will()
        if was:
            self._call_soon(self._on_disconnected)

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._sink is not None:
            try:
                self._sink(msg)
            except Exception as exc:  # noqa: BLE001 — counted and logged with its traceback by _failed
                self._failed("sink", f"{msg.topic}: {exc!r}", exc)
        else:
            self._call_soon(self._queue.put_nowait,
                            Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain, self.connects))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self._call_soon(self._acked, mid)

    # -- loop side ----------------------------------------------------------------------------------------------
    def _acked(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None:
            _resolve(fut)
        elif mid in self._unawaited:
            self._unawaited.discard(mid)
        else:  # acked before publish() returned (QoS 0 written at once)
            self._early.add(mid)

    def _on_connected(self, session_present: bool) -> None:
        if self._connected_async is not None and self.connected:
            self._connected_async.set()
        self._run_hook(self._on_connect_hook, session_present)

    def _on_disconnected(self) -> None:
        if self._connected_async is not None:
            self._connected_async.clear()
        self._run_hook(self._on_disconnect_hook)

    def _run_hook(self, hook: Callable[..., Awaitable[None] | None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(*args)
        except Exception as exc:  # noqa: BLE001 — counted and logged with its traceback by _failed
            self._failed("hook", repr(exc), exc)
            return
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._failed("hook", repr(exc), exc)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        self._early.clear()
        self._unawaited.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(MqttNotConnected(f"client of {self.url} stopped before the broker acknowledged"))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
