"""The controller process: ingest, stale sweep, policy publishing, commands, and the dashboard/REST app.

When the controller loses the broker it cannot vouch for any device, so it marks every online device offline
("controller_lost_broker"); births (retained) bring them back after it reconnects. On each (re)connect it
republishes the last policies (an empty restarted broker has lost the retained ones) and publishes any change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from nanofleet.config import FleetConfig
from nanofleet.controller import policy
from nanofleet.controller.commands import CommandService
from nanofleet.controller.ingest import Ingest
from nanofleet.controller.store import BatchOutcome, Store
from nanofleet.mqtt import MqttError

log = logging.getLogger(__name__)


class ControllerService:
    def __init__(
        self,
        config: FleetConfig,
        data_dir: Path,
        *,
        broker_url: str | None = None,
        mqtt_username: str | None = None,
        mqtt_password: str | None = None,
        share_group: str | None = None,
        listen: str | None = None,
        usage_db: Path | None = None,
        sweep_every_s: float = 0.5,
        telemetry_qos: int = 1,
        ingest_reader: Literal["paho", "builtin"] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.config, self.data_dir = config, Path(data_dir)
        self.broker_url = broker_url or config.broker.url
        self._mqtt = (mqtt_username, mqtt_password)
        self.share_group, self.listen, self.usage_db = share_group, listen, usage_db
        self.sweep_every_s, self.telemetry_qos, self.echo = sweep_every_s, telemetry_qos, echo
        self.ingest_reader = ingest_reader or config.controller.ingest_reader
        self.store: Store | None = None
        self.ingest: Ingest | None = None
        self.commands: CommandService | None = None
        self.policy_rounds = 0
        self._pending_policy: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Any = None
        self.web_port: int | None = None

    async def start(self) -> ControllerService:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = store = await asyncio.to_thread(Store, self.data_dir / "controller.db")
        store.check_gaps = self.share_group is None  # with $share this controller sees only some of a device's seqs
        await asyncio.to_thread(store.set_groups, {d: e.group for d, e in self.config.devices.items()})
        self.ingest = Ingest(store, self.config.fleet, self.broker_url, username=self._mqtt[0],
                             password=self._mqtt[1], share_group=self.share_group, telemetry_qos=self.telemetry_qos,
                             on_outcome=self._on_outcome, on_result=self._on_result,
                             on_connection=self._on_connection, transport=self.ingest_reader)
        self.commands = CommandService(self.ingest.client, self.config.fleet)
        await self.ingest.start()
        self._spawn(self._sweep())
        if self.listen:
            await self._start_web(self.listen)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.ingest is not None:
            await self.ingest.stop()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("controller task failed: %r", task.exception())

    # -- events ---------------------------------------------------------------------------------------------------
    def _on_connection(self, up: bool) -> None:
        assert self.store is not None
        if up:
            self._spawn(self._publish_policies(republish=True))
        else:
            self._spawn(asyncio.to_thread(self.store.mark_all, "offline", "controller_lost_broker"))

    def _on_result(self, result: Any) -> None:
        if self.commands is not None:
            self.commands.on_result(result)

    def _on_outcome(self, outcome: BatchOutcome) -> None:
        assert self.commands is not None and self.ingest is not None
        for device_id in outcome.rebirth:
            if self.ingest.client.connected:
                with contextlib.suppress(MqttError):
                    self.commands.fire(device_id, "rebirth")
        # a new device needs its first policy; every birth (a `rebirth` of the same session too) gets its policy
        # again, live: that tells the device the controller listens (it replays its buffer then), restores a
        # retained copy a broker lost, and replaces a stray policy the device took (it applies the last received)
        fresh = set(outcome.new_devices) | set(outcome.births)
        if fresh:
            first = not self._pending_policy
            self._pending_policy.update(fresh)
            if first:
                self._spawn(self._publish_policies(delay=0.05))

    async def _publish_policies(self, republish: bool = False, delay: float = 0.0) -> None:
        assert self.store is not None and self.ingest is not None
        await asyncio.sleep(delay)
        client = self.ingest.client
        try:
            if republish:
                await policy.republish(client, self.store, self.config.fleet)
                version, changes = await policy.apply(client, self.store, self.config, new_only=True)
            else:
                ids, self._pending_policy = self._pending_policy, set()
                version, changes = await policy.apply(client, self.store, self.config, ids, new_only=True)
                changed = {c.device_id for c in changes}
                await policy.republish(client, self.store, self.config.fleet, only=ids - changed)
        except (TimeoutError, MqttError):
            return  # the connection went away; the next connect publishes again
        if changes:
            self.policy_rounds += 1
            log.info("published policy version %d to %d devices", version, len(changes))

    async def _sweep(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.sweep_every_s)
            for ev in await asyncio.to_thread(self.store.sweep_stale):
                log.info("device %s is stale (silent)", ev.device_id)

    # -- web ------------------------------------------------------------------------------------------------------
    async def _start_web(self, listen: str) -> None:
        import uvicorn

        from nanofleet.controller.auth import ensure_operator_token
        from nanofleet.controller.web.app import create_app

        token, token_hash = await asyncio.to_thread(ensure_operator_token, self.data_dir)
        if token:
            self.echo(f"operator token: {token}  (shown once; stored hashed in {self.data_dir})")
        app = create_app(self.store, self.config, operator_token_hash=token_hash, commands=self.commands,
                         usage_db=self.usage_db)
        host, port = listen.rsplit(":", 1)

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the controller handles signals itself
                yield

        server = _Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning", access_log=False,
                                        lifespan="off"))
        self._server = server
        task = self._spawn(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"dashboard did not start on {listen}")
            await asyncio.sleep(0.02)
        self.web_port = server.servers[0].sockets[0].getsockname()[1] if server.servers else int(port)
        self.echo(f"dashboard: http://{host}:{self.web_port}/")
