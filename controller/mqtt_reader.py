"""The controller's MQTT 3.1.1 reader: the ingest hot path's subscription (and the controller's publishing).

Why not a library: measured side by side (docs/operations.md, "The ingest reader: why"), paho costs ~3x and gmqtt
~1.2x this reader's CPU a message inside the controller, and neither kept 20,000 msg/s with nothing dropped in one
process. This reads the socket in large chunks on its own thread and cuts PUBLISH packets out of the buffer in one
loop, handing (topic, payload) pairs to `sink` a chunk at a time. It speaks only what a subscriber needs: CONNECT
(user name, password, clean session, keepalive), SUBSCRIBE, PUBLISH both ways (QoS 0/1, PUBACK), PINGREQ,
DISCONNECT, over TCP or TLS (mqtts://, verified against the fleet's CA or the system store). It reconnects after
any failure (a refused or lost connection, bytes that are not MQTT, a bug) with nanofleet.backoff's delay, never
leaving a dead thread behind: each failure is logged, counted in `failures` and kept in `last_error`. The controller
also publishes on this connection, so what it publishes after a (re)subscription is ordered after the SUBSCRIBE,
and nothing from a previous connection is resent later (a publish in flight when the connection drops fails).

Runs in its own thread; `sink` and `on_connection` are called from that thread and must be cheap.

Exceptions: MqttError (nanofleet.mqtt's root) ← SubscriberRefused, MqttProtocolError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nanofleet.backoff import Backoff
from nanofleet.mqtt import MqttError, check_ca, parse_broker_url

log = logging.getLogger(__name__)
_PINGREQ, _DISCONNECT = b"\xc0\x00", b"\xe0\x00"


class SubscriberRefused(MqttError):
    """The broker refused the connection (CONNACK return code) or a subscription (SUBACK 0x80)."""


class MqttProtocolError(MqttError):
    """The broker sent bytes that are not MQTT 3.1.1: the reader drops the connection and reconnects."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, *, clean_session: bool = True, keepalive: int = 30,
                   username: str | None = None, password: str | None = None) -> bytes:
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0) | (
        0x40 if password is not None and username is not None else 0)
    var = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", keepalive)
    payload = _str(client_id)
    if username is not None:
        payload += _str(username)
        if password is not None:
            payload += _str(password)
    body = var + payload
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_str(f) + bytes([q]) for f, q in filters)
    return b"\x82" + _varint(len(body)) + body


def unsubscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_str(f) for f in filters)
    return b"\xa2" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, retain: bool = False, packet_id: int = 0) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + _varint(len(body)) + body


def parse(buf: bytearray, out: list[tuple[str, bytes]], acks: list[bytes],
          pubacks: list[int] | None = None, ack_at: list[int] | None = None) -> tuple[int, list[int]]:
    """Cut whole packets from `buf`: PUBLISH -> `out` (and a PUBACK into `acks` for QoS 1, with the message's
    index in `out` into `ack_at` when given), PUBACK ids -> `pubacks`. Returns how many bytes were consumed and
    the other packet types seen (9 SUBACK, -9 refused).
    A packet that cannot be what its header says raises MqttProtocolError, once it is whole (so the result never
    depends on how the stream was split); everything before it has been handed out."""
    i, n = 0, len(buf)
    other: list[int] = []
    while n - i >= 2:
        b0 = buf[i]
        j, mult, rl = i + 1, 1, 0
        while True:
            if j >= n:
                return i, other
            d = buf[j]
            rl += (d & 0x7F) * mult
            j += 1
            if not d & 0x80:
                break
            mult <<= 7
            if mult > 0x200000:
                raise MqttProtocolError("malformed remaining length (more than 4 bytes)")
        end = j + rl
        if end > n:
            break
        if b0 >> 4 == 3:
            if rl < 2:
                raise MqttProtocolError(f"PUBLISH of {rl} bytes cannot hold its topic length")
            k = j + 2 + ((buf[j] << 8) | buf[j + 1])
            topic = buf[j + 2:k].decode("utf-8", "replace")
            if b0 & 0x06:
                if b0 & 0x06 == 0x06:
                    raise MqttProtocolError("PUBLISH with QoS 3")
                if k + 2 > end:
                    raise MqttProtocolError(f"PUBLISH of {rl} bytes cannot hold its topic and packet id")
                acks.append(b"\x40\x02" + bytes(buf[k:k + 2]))
                if ack_at is not None:
                    ack_at.append(len(out))
                k += 2
            elif k > end:
                raise MqttProtocolError(f"PUBLISH of {rl} bytes cannot hold its {k - j - 2}-byte topic")
            out.append((topic, bytes(buf[k:end])))
        elif b0 >> 4 == 4 and pubacks is not None and rl >= 2:
            pubacks.append((buf[j] << 8) | buf[j + 1])
        else:
            other.append(b0 >> 4)
            if b0 >> 4 == 9 and any(c == 0x80 for c in buf[j + 2:end]):
                other.append(-9)  # a refused subscription
        i = end
    return i, other


class MqttReader:
    """One subscription on its own thread: `start()`, `publish()` from any thread, `stop()` (blocking)."""

    def __init__(
        self,
        url: str,
        filters: Sequence[tuple[str, int]],
        sink: Callable[[list[tuple[str, bytes]]], None],
        *,
        client_id: str = "",
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        backoff: tuple[float, float] = (0.2, 10.0),
        on_connection: Callable[[bool], None] | None = None,
        recv_bytes: int = 1 << 18,
        busy: Callable[[], bool] | None = None,
        ca: str | Path | None = None,
        ack_after_commit: bool = False,
    ) -> None:
        self.host, self.port, self.tls = parse_broker_url(url)
        check_ca(url, self.tls, ca)
        # mqtts://: the broker's certificate is verified (host name included) against `ca`, else the system store
        self._tls = ssl.create_default_context(cafile=str(ca) if ca is not None else None) if self.tls else None
        self.url, self.filters, self.sink = url, list(filters), sink
        self.client_id = client_id or f"nanofleet-sub-{random.getrandbits(40):010x}"
        self._connect = connect_packet(self.client_id, clean_session=clean_session, keepalive=keepalive,
                                       username=username, password=password)
        self.keepalive, self.recv_bytes = keepalive, recv_bytes
        self._backoff = Backoff(*backoff)
        self.on_connection = on_connection
        self.busy = busy  # True: the consumer is behind; stop reading so TCP pushes back to the broker
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None
        # by kind: protocol, refused, connection, internal (each followed by a reconnect), observer
        self.failures: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._next_id = 1
        self._inflight: dict[int, Callable[[BaseException | None], None]] = {}
        # ack_after_commit: a QoS 1 PUBLISH is acknowledged only once the consumer says it is stored
        # (`commit_through`), so a controller killed mid-batch leaves it unacknowledged in its persistent session
        # and the broker delivers it again when the controller (the same client id) comes back.
        self.ack_after_commit = ack_after_commit
        self._sunk = 0  # messages handed to `sink` since start (all connections)
        self._pending: collections.deque[tuple[int, int, bytes]] = collections.deque()  # (message no., conn., ack)
        self._conn_no = 0  # which connection a PUBACK belongs to: packet ids mean nothing on the next one
        # the open connection, from CONNACK on: a persistent session's messages redelivered before the SUBACK are
        # acknowledged on it too (`_sock` is set only at SUBACK, for publishing)
        self._ack_sock: socket.socket | None = None
        self._pending_lock = threading.Lock()
        self.acks_dropped = 0  # PUBACKs of a connection that ended first (the broker sends those messages again)
        self._thread = threading.Thread(target=self._run, name=f"mqtt-sub:{self.host}:{self.port}", daemon=True)

    def start(self) -> MqttReader:
        self._thread.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Disconnect cleanly and join the thread (blocking: call it off the event loop)."""
        self._stop.set()
        self._thread.join(grace)

    @property
    def received(self) -> int:
        """Messages handed to `sink` since start (what `commit_through` counts in)."""
        return self._sunk

    def commit_through(self, n: int) -> None:
        """The consumer stored the first `n` messages handed to `sink` (any thread): acknowledge their QoS 1
        PUBLISHes, in the order they came (MQTT 3.1.1 4.6). Acks of a connection that has ended are dropped."""
        with self._pending_lock:
            due = []
            while self._pending and self._pending[0][0] <= n:
                due.append(self._pending.popleft())
        if not due:
            return
        with self._send_lock:
            sock = self._ack_sock
            acks = [a for _, conn_no, a in due if conn_no == self._conn_no]
            self.acks_dropped += len(due) - len(acks)
            if sock is None:
                self.acks_dropped += len(acks)
                return
            if not acks:
                return
            try:
                sock.sendall(b"".join(acks))
            except OSError:  # the reader thread sees the connection die and reconnects; the broker resends
                self.acks_dropped += len(acks)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                on_done: Callable[[BaseException | None], None] | None = None) -> None:
        """Send on the current connection (any thread). QoS 1: `on_done(None)` on PUBACK, `on_done(error)` if the
        connection drops first; QoS 0: `on_done(None)` once written. MqttNotConnected when not subscribed."""
        from nanofleet.mqtt import MqttNotConnected

        data = payload.encode() if isinstance(payload, str) else payload
        with self._send_lock:
            sock = self._sock
            if sock is None or not self.connected:
                raise MqttNotConnected(f"not connected to {self.url}")
            pid = 0
            if qos:
                while self._next_id in self._inflight or self._next_id == 1:  # id 1 is the SUBSCRIBE's
                    self._next_id = self._next_id % 65535 + 1
                pid, self._next_id = self._next_id, self._next_id % 65535 + 1
                self._inflight[pid] = on_done or (lambda exc: None)
            try:
                sock.sendall(publish_packet(topic, data, 1 if qos else 0, retain, pid))
            except OSError as exc:
                self._inflight.pop(pid, None)
                raise MqttNotConnected(f"connection to {self.url} failed: {exc}") from exc
        if not qos and on_done is not None:
            on_done(None)

    def _settle(self, pids: list[int]) -> None:
        with self._send_lock:
            done = [self._inflight.pop(p) for p in pids if p in self._inflight]
        for cb in done:
            cb(None)

    def _fail_inflight(self) -> None:
        from nanofleet.mqtt import MqttNotConnected

        with self._send_lock:
            pending, self._inflight = self._inflight, {}
        for cb in pending.values():
            cb(MqttNotConnected("connection lost before PUBACK"))

    # -- the thread ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        """Connect, read until the connection fails, wait (the one backoff rule), again — until stop(). Every
        failure is logged, counted in `failures` by kind and kept in `last_error`; none ends the thread."""
        while not self._stop.is_set():
            sock: socket.socket | None = None
            try:
                sock = self._open()
                with self._send_lock:
                    self._ack_sock = sock
                self._read(sock)
            except (OSError, MqttError) as exc:
                self._failed(exc)
            except Exception as exc:  # a bug in this module or in `sink`: the traceback is what fixes it
                self._failed(exc)
                log.exception("mqtt reader %s: %s; reconnecting", self.url, self.last_error)
            finally:
                if sock is not None:
                    self._close(sock)
            if not self._stop.is_set():
                self._stop.wait(self._backoff.next())

    def _failed(self, exc: Exception) -> None:
        kind = ("protocol" if isinstance(exc, MqttProtocolError) else "refused" if isinstance(exc, SubscriberRefused)
                else "connection" if isinstance(exc, OSError) else "internal")
        self.failures[kind] += 1
        self.last_error = f"{kind}: {str(exc) or type(exc).__name__}"
        quiet = kind == "connection" and not self.connected and self._backoff.attempt > 0  # a retry: counted only
        if kind != "internal" and not quiet:
            log.warning("mqtt reader %s: %s; reconnecting", self.url, self.last_error)

    def _close(self, sock: socket.socket) -> None:
        with self._send_lock:
            was, self.connected, self._sock, self._ack_sock = self.connected, False, None, None
            self._conn_no += 1  # PUBACKs still pending belong to the connection that ended
        self._fail_inflight()
        if self._stop.is_set():
            # A persistent session in a $share group leaving for good takes its subscriptions along: else the broker
            # goes on routing the group's messages to it (mosquitto does) and they wait for a return that may never
            # come. Processed before the DISCONNECT that follows (in order, on one connection).
            shared = [f for f, _ in self.filters if f.startswith("$share/")]
            bye = (unsubscribe_packet(2, shared) if shared and was else b"") + _DISCONNECT
            with contextlib.suppress(OSError), self._send_lock:  # best effort: the broker drops us either way
                sock.sendall(bye)
                # the broker closes its side after the DISCONNECT; reading what it sent meanwhile until then keeps
                # our close a FIN: closing with unread data sends a RST, and the broker may drop the PUBACKs and
                # the UNSUBSCRIBE it had not read yet (seen: a $share session left subscribed, acks lost)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and sock.recv(1 << 16):
                    pass
        sock.close()
        if was:
            self._notify(False)

    def _notify(self, up: bool) -> None:
        if self.on_connection is not None:
            try:
                self.on_connection(up)
            except Exception as exc:  # a broken observer must not kill ingest: counted, logged, kept
                self.failures["observer"] += 1
                self.last_error = f"observer: {exc!r}"
                log.exception("mqtt reader %s: on_connection failed", self.url)

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.sendall(self._connect)
            head = self._recv_exact(sock, 4)
            if head[0] != 0x20 or head[3] != 0:
                raise SubscriberRefused(f"broker {self.url} refused the connection (CONNACK code {head[3]})")
            sock.sendall(subscribe_packet(1, self.filters))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(0.25)
        return sock

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed during handshake")
            data += chunk
        return data

    def _recv_plain(self, sock: socket.socket) -> bytes | None:
        try:
            return sock.recv(self.recv_bytes)
        except TimeoutError:
            return None

    def _recv_tls(self, sock: socket.socket) -> bytes | None:
        """OpenSSL forbids one connection to read and write from two threads at once (publish() writes from the
        event loop's): wait for data without the lock, then read under the lock that every write holds."""
        assert isinstance(sock, ssl.SSLSocket)
        if not sock.pending() and not select.select([sock], [], [], 0.25)[0]:
            return None
        with self._send_lock:
            try:
                return sock.recv(self.recv_bytes)
            except TimeoutError:
                return None

    def _read(self, sock: socket.socket) -> None:
        buf = bytearray()
        last_sent = last_heard = time.monotonic()
        ping_out = False
        recv = self._recv_tls if self._tls is not None else self._recv_plain
        while not self._stop.is_set():
            if self.busy is not None and self.busy():
                time.sleep(0.002)
                data = None
                if time.monotonic() - last_sent < self.keepalive / 2:
                    continue
            data = recv(sock)
            now = time.monotonic()
            if data is not None:
                if not data:
                    raise ConnectionError("broker closed the connection")
                buf += data
                last_heard = now
                out: list[tuple[str, bytes]] = []
                acks: list[bytes] = []
                pubacks: list[int] = []
                ack_at: list[int] | None = [] if self.ack_after_commit else None
                used, other = parse(buf, out, acks, pubacks, ack_at)
                del buf[:used]
                if ack_at is not None and acks:
                    with self._pending_lock:  # numbered before the sink sees them: commit_through may follow at once
                        self._pending.extend((self._sunk + k + 1, self._conn_no, a)
                                             for k, a in zip(ack_at, acks, strict=True))
                    acks = []
                self._sunk += len(out)
                if out:
                    self.sink(out)
                if acks:
                    with self._send_lock:
                        sock.sendall(b"".join(acks))
                    last_sent = now
                if pubacks:
                    self._settle(pubacks)
                if -9 in other:
                    raise SubscriberRefused(f"broker {self.url} refused a subscription of {self.filters}")
                if 9 in other and not self.connected:  # SUBACK: from here on nothing published is missed
                    with self._send_lock:
                        self.connects += 1
                        self.connected, self._sock = True, sock
                    self._backoff.reset()
                    self._notify(True)
                if 13 in other:
                    ping_out = False
            if now - last_sent >= self.keepalive / 2:
                with self._send_lock:
                    sock.sendall(_PINGREQ)
                last_sent, ping_out = now, True
            if ping_out and now - last_heard > self.keepalive:
                raise ConnectionError("broker stopped answering pings")


class AsyncPublisher:
    """The publishing face of a MqttReader for asyncio code (the shape of MqttClient's publish side)."""

    def __init__(self, sub: MqttReader) -> None:
        self.sub = sub
        self.url = sub.url
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    @property
    def connected(self) -> bool:
        return self.sub.connected

    @property
    def last_error(self) -> str | None:
        return self.sub.last_error

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> asyncio.Future[None]:
        loop = self.loop
        assert loop is not None, "start() first"
        fut: asyncio.Future[None] = loop.create_future()

        def done(exc: BaseException | None) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(None)

            if threading.get_ident() == self._loop_thread:
                settle()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle)

        self.sub.publish(topic, payload, qos, retain, done)
        return fut

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        try:
            self.sub.publish(topic, payload, qos, retain)
        except MqttError:
            return False
        return True

    async def start(self) -> AsyncPublisher:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.sub.start()
        return self

    async def stop(self) -> None:
        await asyncio.to_thread(self.sub.stop)
