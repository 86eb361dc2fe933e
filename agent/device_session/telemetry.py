"""Telemetry: a sample every interval, published live when the controller listens, else into the disk buffer,
replayed in order (flagged `replayed`) once it does; a batch leaves the buffer only after the broker acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nanofleet.mqtt import MqttError
from nanofleet.protos import fleet_pb2

from .base import SessionBase, now_ms, to_json

log = logging.getLogger("nanofleet.agent.device_session")  # one logger for the session, whichever module


class TelemetryLoops(SessionBase):
    async def sample(self) -> fleet_pb2.Telemetry:
        t = await asyncio.to_thread(self.collector.sample)
        m = self.hooks.agent_metrics()
        t.device_id, t.bd_seq, t.seq = self.device_id, self.bd_seq, self.seq
        self.seq = (self.seq + 1) & 0xFF
        if not t.ts_ms:
            t.ts_ms = now_ms()
        t.model.CopyFrom(self.hooks.model_state())
        for route, n in m.route_counts.items():
            t.route_counts[route] = n
        t.queue_depth = m.queue_depth
        t.slots_waiting = m.slots_waiting
        t.queue_oldest_age_s = m.queue_oldest_age_s
        for name, n in m.queue_counters.items():
            t.queue_counters[name] = n
        t.policy_version = self.policy_version or m.policy_version
        t.gateway_reachable = m.gateway_reachable
        return t

    async def _telemetry_loop(self) -> None:
        assert self.buffer is not None and self.client is not None
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self._wake.clear()
            if not self.paused:
                t = await self.sample()
                live = self._listening()
                if live and not self._replay.is_set() and not self._buffered:
                    if self.client.publish_nowait(self._t_telemetry, to_json(t), qos=1):
                        self.sent += 1
                    else:  # lost the connection between the check and the publish
                        await self._push(t)
                else:
                    dropped = await self._push(t)
                    if dropped:
                        log.warning("%s: telemetry buffer full, dropped %d oldest", self.device_id, dropped)
                    if self.connected:
                        self._replay.set()
            next_at = max(next_at + self.interval_s, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_at - loop.time()):  # unlike 3.11's wait_for, never eats a cancel
                    await self._wake.wait()
            if self._wake.is_set() and loop.time() < next_at:
                next_at = loop.time()  # interval changed or reconnected: sample now

    def _listening(self) -> bool:
        """Connected, and the controller was seen listening on this very connection (not a previous one)."""
        return self.client is not None and self.client.connected and self._listening_conn == self.client.connects

    async def _await_listener(self) -> None:
        """Until the controller listens on this connection; after replay_grace_s, assume it does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replay_grace_s
        while not self._listening() and self.connected:
            self._controller_listening.clear()
            left = deadline - loop.time()
            if left <= 0:
                assert self.client is not None
                self._listening_conn = self.client.connects
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._controller_listening.wait()

    async def _push(self, t: fleet_pb2.Telemetry) -> int:
        assert self.buffer is not None
        dropped = await asyncio.to_thread(self.buffer.push, t.SerializeToString())
        self._buffered = self._buffered + 1 - dropped
        return dropped

    async def _replay_loop(self) -> None:
        assert self.buffer is not None and self.client is not None
        while True:
            await self._replay.wait()
            await self._await_listener()
            try:
                while self._listening():  # not merely connected: the controller must be subscribed (see above)
                    batch = await asyncio.to_thread(self.buffer.peek, 200)
                    if not batch:
                        break
                    futs = []
                    conn = self.client.connects
                    for _, payload in batch:
                        t = fleet_pb2.Telemetry.FromString(payload)
                        t.replayed = True
                        futs.append(self.client.publish(self._t_telemetry, to_json(t), qos=1))
                    try:
                        async with asyncio.timeout(15):
                            await asyncio.gather(*futs)
                    except TimeoutError:
                        if not self.connected:
                            break  # paho resends them after reconnecting; the buffer keeps them meanwhile
                        raise
                    if self.client.connects != conn:
                        # acked only after paho resent them on a new connection, possibly before the controller
                        # subscribed there: keep them and send again (the controller drops duplicates)
                        continue
                    await asyncio.to_thread(self.buffer.delete, [i for i, _ in batch])
                    self._buffered = max(0, self._buffered - len(batch))
                    self.sent += len(batch)
            except (MqttError, OSError, TimeoutError) as exc:  # the loop dies (and restarts) on anything else
                self.counts["replay_interrupted"] += 1
                log.warning("%s: replay interrupted: %r", self.device_id, exc)
                await asyncio.sleep(0.5)
                continue
            if self._listening() and not self._buffered:
                self._replay.clear()
            else:
                await asyncio.sleep(0.1)
