"""gmqtt (a maintained asyncio MQTT client) as ingest's transport — for bench/bench_ingest.py only.

The measurement that kept the controller's own reader (docs/operations.md, "The ingest reader: why") compares it
with this: `GmqttIngest` is the controller's Ingest with gmqtt reading the subscription, everything else equal.

The same face as `AsyncPublisher` over the builtin reader (`connected`, `last_error`, `connects`, `publish`,
`publish_nowait`, `start`, `stop`) and the same hand-over: each PUBLISH goes to `sink` as a (topic, payload) pair,
`on_connection(True)` comes after the SUBACK. It runs on the controller's event loop; gmqtt reconnects by itself.
Limits against the builtin reader: a QoS 1 publish's future completes once written (gmqtt does not expose the
PUBACK), and there is no read backpressure (`busy`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

from nanofleet.controller.ingest import Ingest
from nanofleet.mqtt import MqttNotConnected, check_ca, parse_broker_url

log = logging.getLogger(__name__)


class GmqttTransport:
    def __init__(self, url: str, filters: Sequence[tuple[str, int]],
                 sink: Callable[[tuple[str, bytes]], None], *, client_id: str = "",
                 username: str | None = None, password: str | None = None, keepalive: int = 30,
                 on_connection: Callable[[bool], None] | None = None, ca: str | Path | None = None) -> None:
        self.host, self.port, tls = parse_broker_url(url)
        check_ca(url, tls, ca)
        self.url, self.filters, self.sink = url, list(filters), sink
        self.keepalive, self.on_connection = keepalive, on_connection
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca) if ca else None) if tls else False
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None
        c = gmqtt.Client(client_id or None, clean_session=True)
        if username is not None:
            c.set_auth_credentials(username, password)
        c.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        c.on_connect, c.on_subscribe, c.on_message, c.on_disconnect = (
            self._cb_connect, self._cb_subscribe, self._cb_message, self._cb_disconnect)
        self.client = c

    def _cb_connect(self, client: gmqtt.Client, flags: int, rc: int, props: Any) -> None:
        for topic, qos in self.filters:
            client.subscribe(topic, qos)

    def _cb_subscribe(self, client: gmqtt.Client, mid: int, qos: Any, props: Any) -> None:
        if not self.connected:
            self.connected, self.connects, self.last_error = True, self.connects + 1, None
            if self.on_connection is not None:
                self.on_connection(True)

    def _cb_message(self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, props: Any) -> int:
        self.sink((topic, payload))
        return 0

    def _cb_disconnect(self, client: gmqtt.Client, packet: Any, exc: BaseException | None = None) -> None:
        if exc is not None:
            self.last_error = f"connection: {exc}"
        if self.connected:
            self.connected = False
            if self.on_connection is not None:
                self.on_connection(False)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> asyncio.Future[None]:
        if not self.connected:
            raise MqttNotConnected(f"not connected to {self.url}")
        self.client.publish(topic, payload, qos=qos, retain=retain)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        if not self.connected:
            return False
        self.client.publish(topic, payload, qos=qos, retain=retain)
        return True

    async def start(self) -> GmqttTransport:
        await self.client.connect(self.host, self.port, ssl=self.ssl, keepalive=self.keepalive, version=MQTTv311)
        return self

    async def stop(self) -> None:
        await self.client.disconnect()
        self.connected = False


class GmqttIngest(Ingest):
    """Ingest whose subscription gmqtt reads: the same inbox, ingest thread, decode and store as the real one."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, transport="paho", **kw)  # its paho client is replaced before start(), never used
        url = args[2] if len(args) > 2 else kw["broker_url"]
        self.client = GmqttTransport(  # type: ignore[assignment]
            url, self.filters, self._inbox.append, client_id=kw.get("client_id", ""), on_connection=self._on_up)

    def _on_up(self, up: bool) -> None:
        if up:
            self._connected(False)
        else:
            self._disconnected()
