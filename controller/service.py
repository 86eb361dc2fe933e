"""The controller process: ingest, stale sweep, policy publishing, commands, and the dashboard/REST app.

Several controllers can share one fleet (PostgreSQL store, `--share-group`): every one ingests its share of the
messages, and what must happen once per fleet runs only on the leader (controller/leader.py: a PostgreSQL advisory
lock; on SQLite the one controller always leads) and starts and stops with leadership: the alert engine, the
rollout engine, the stale sweep, policy republishing on (re)connect and on taking the lead, and, under `$share`,
Sparkplug gap judgment from the stored rows (controller/gaps.py; the live check sees only a share of each device's
seqs). A birth's policy is published by the controller that took the birth (each birth reaches one of them).

When a lone controller loses the broker it cannot vouch for any device, so it marks every online device offline
("controller_lost_broker"); births (retained) bring them back after it reconnects. Under `$share` one controller
losing the broker says nothing about the devices (the others still hear them): the leader's stale sweep judges
silence instead. On each (re)connect the leader republishes the last policies (an empty restarted broker has lost
the retained ones) and publishes any change.

Every task runs under nanofleet.tasks.TaskSupervisor: the stale sweep is restarted when it dies; the dashboard
server and the ingest thread are fatal (`failed` is set, `wait_failed()` returns, the CLI exits non-zero so systemd
or `nanofleet up` restarts the process); one-shot work (policy publishing, marking devices offline) is logged and
recorded. `status()` shows what runs, what died and ingest's counters (dropped writes included) for the dashboard,
health and metrics; `stop()` raises what went wrong while stopping instead of swallowing it. `metrics` is a
Prometheus registry over `status()` (controller/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from nanofleet.config import FleetConfig
from nanofleet.controller import gaps, policy
from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.alerts_engine import AlertEngine
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.commands import CommandError, CommandService
from nanofleet.controller.devstate import REBIRTH_EVERY_MS
from nanofleet.controller.events import FleetEvents
from nanofleet.controller.ingest import Ingest, durable_client_id
from nanofleet.controller.leader import Leadership
from nanofleet.controller.metrics import registry_for
from nanofleet.controller.rollout_engine import RolloutEngine
from nanofleet.controller.store import BatchOutcome, Store
from nanofleet.controller.views import DeviceEvent
from nanofleet.mqtt import MqttError
from nanofleet.store_url import StoreTarget, resolve
from nanofleet.tasks import TaskSupervisor

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
        usage_db: Path | StoreTarget | None = None,
        sweep_every_s: float = 0.5,
        telemetry_qos: int = 1,
        ingest_reader: Literal["paho", "builtin"] | None = None,
        echo: Callable[[str], None] = print,
        rollout_every_s: float = 2.0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        alerts_every_s: float = 1.0,
        store_url: str | None = None,
        gaps_every_s: float = 1.0,
        gap_settle_ms: int = gaps.SETTLE_MS,
        leader_retry_s: float = 1.0,
    ) -> None:
        self.config, self.data_dir = config, Path(data_dir)
        self.broker_url = broker_url or config.broker.url
        self._mqtt = (mqtt_username, mqtt_password)
        self.share_group, self.listen, self.usage_db = share_group, listen, usage_db
        self.sweep_every_s, self.telemetry_qos, self.echo = sweep_every_s, telemetry_qos, echo
        self.ingest_reader = ingest_reader or config.controller.ingest_reader
        # --store overrides fleet.yaml's store.url; neither: controller.db in the data folder
        self.target: StoreTarget = resolve(store_url or config.store.url, self.data_dir, "controller.db")
        if self.usage_db is None and self.target.kind == "postgresql":
            self.usage_db = self.target  # gateways sharing the fleet's PostgreSQL keep tokens and usage there too
        self.leader = Leadership(self.target.url if self.target.kind == "postgresql" else None, config.fleet,
                                 retry_s=leader_retry_s, check_s=leader_retry_s, on_change=self._on_leadership)
        self.gaps_every_s, self.gap_settle_ms = gaps_every_s, gap_settle_ms
        self.gap_rounds = 0
        self.gaps_found = 0  # missing seqs judged from stored rows (under $share)
        self._gap_asked: dict[str, int] = {}
        self._broker_up = False  # the last connection state ingest reported (_on_connection)
        self.store: Store | None = None
        self.rollout_every_s = rollout_every_s
        self.rollouts: RolloutEngine | None = None
        self.ingest: Ingest | None = None
        self.commands: CommandService | None = None
        self.events = FleetEvents()  # live dashboard events: ingest, the sweep, the alerts and the audit log publish
        self._extra_on_event, self.alerts_every_s = on_event, alerts_every_s
        self.alerts: AlertStore | None = None
        self.alert_engine: AlertEngine | None = None
        self.audit: AuditLog | None = None
        self._engine_usage: Any = None  # web.context.UsageReader over the gateway's usage db, when given
        self._nudges = 0  # state changes outside ingest (the stale sweep): the alert engine evaluates soon after
        self._web: Any = None  # the web app's context (its counters show in status())
        self.policy_rounds = 0
        self.rebirth_failures = 0
        self.policy_failures = 0
        self._pending_policy: set[str] = set()
        self.tasks = TaskSupervisor("controller", on_fatal=self._fatal)
        self.failed: tuple[str, BaseException] | None = None  # the fatal death that ended this service, if any
        self._failed = asyncio.Event()
        self.started_at: float | None = None
        self.metrics = registry_for(self.status)  # the web layer serves metrics.render(self.metrics) at /metrics
        self._server: Any = None
        self.web_port: int | None = None

    async def start(self) -> ControllerService:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.events.bind(asyncio.get_running_loop())
        self.store = store = await asyncio.to_thread(self._open_store)
        store.check_gaps = self.share_group is None  # with $share this controller sees only some of a device's seqs
        await asyncio.to_thread(store.set_group_resolver, self.config.group_of)
        # fleet.yaml's devices that never sent anything show as never_seen (the dashboard and API list them)
        await asyncio.to_thread(store.expect_devices, self.config.fleet, list(self.config.devices))
        self.alerts = AlertStore(store, on_change=self.on_event)
        self.audit = AuditLog(store, on_change=self.on_event)
        if self.usage_db is not None:
            from nanofleet.controller.web.context import UsageReader  # the web layer's reader, imported on use

            self._engine_usage = UsageReader(self.usage_db)
        self.alert_engine = AlertEngine(self.alerts, self.config,
                                        usage=self._engine_usage.rows if self._engine_usage is not None else None)
        self.ingest = Ingest(store, self.config.fleet, self.broker_url, username=self._mqtt[0],
                             password=self._mqtt[1], share_group=self.share_group, telemetry_qos=self.telemetry_qos,
                             on_outcome=self._on_outcome, on_changes=self.events.publish_devices,
                             on_result=self._on_result,
                             on_connection=self._on_connection, transport=self.ingest_reader,
                             on_thread_death=lambda exc: self._fatal("ingest", exc),
                             ca=self.config.broker.ca if self.broker_url.startswith("mqtts://") else None,
                             durable=self.ingest_reader == "builtin",  # paho acks on receipt: not durable
                             client_id=durable_client_id(self.config.fleet, self.data_dir)
                             if self.ingest_reader == "builtin" else "")
        self.commands = CommandService(self.ingest.client, self.config.fleet)
        await self.ingest.start()
        self.rollouts = rollouts = RolloutEngine(store, self.config, self.ingest.client,
                                                 every_s=self.rollout_every_s, audit=self.audit)
        self.tasks.spawn(self.leader.run, "leader", on_death="restart")
        lead = self.leader.run_while_leader  # these run on the leader only, from when it leads until it steps down
        self.tasks.spawn(lambda: lead(self._sweep), "sweep", on_death="restart")
        self.tasks.spawn(lambda: lead(rollouts.run), "rollouts", on_death="restart")
        self.tasks.spawn(lambda: lead(self._alerts), "alerts", on_death="restart")
        if self.share_group is not None:
            self.tasks.spawn(lambda: lead(self._gaps), "gaps", on_death="restart")
        if self.listen:
            await self._start_web(self.listen)
        self.started_at = time.time()
        return self

    async def stop(self) -> None:
        """Stop everything, each step even when an earlier one failed; then raise what failed (ExceptionGroup)."""
        self.events.close()  # open /events streams end, so the web server's graceful shutdown does not wait on them
        if self._server is not None:
            self._server.should_exit = True
        errors = list(await self.tasks.stop())
        if self.ingest is not None:
            try:
                await self.ingest.stop()
            except Exception as exc:  # collected: the store still closes; raised below
                log.exception("controller: stopping ingest failed")
                errors.append(exc)
        if self._engine_usage is not None:
            self._engine_usage.close()
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.close)
            except Exception as exc:  # collected, raised below
                log.exception("controller: closing the store failed")
                errors.append(exc)
        if errors:
            raise BaseExceptionGroup("controller: errors while stopping", errors)

    def _open_store(self) -> Store:
        """The SQLite file, or the PostgreSQL database (Store takes the URL; the password never reaches a log)."""
        if self.target.kind == "postgresql":
            assert self.target.url is not None
            return Store(self.target.url)
        assert self.target.path is not None
        return Store(self.target.path)

    def _fatal(self, name: str, exc: BaseException) -> None:
        """A part the controller cannot run without died: say so, and let the process end (then be restarted)."""
        if self.failed is None:
            self.failed = (name, exc)
            log.critical("controller: %s died (%s: %s); the controller stops", name, type(exc).__name__, exc)
        self._failed.set()

    async def wait_failed(self) -> tuple[str, BaseException]:
        """Return when a fatal part died (the CLI then exits non-zero)."""
        await self._failed.wait()
        assert self.failed is not None
        return self.failed

    def status(self) -> dict[str, Any]:
        """What runs and what died, and ingest's and the store's counters: for the dashboard, health and metrics."""
        ingest = self.ingest
        store = self.store
        return {
            "ok": self.failed is None,
            "failed": None if self.failed is None else {"task": self.failed[0],
                                                        "error": f"{type(self.failed[1]).__name__}: {self.failed[1]}"},
            "started_at": self.started_at,
            "tasks": self.tasks.status(),
            "broker_connected": bool(ingest and ingest.connected),
            "leader": self.leader.status(),
            "store_target": {"kind": self.target.kind, "where": str(self.target)},
            "gaps": {"rounds": self.gap_rounds, "missing": self.gaps_found,
                     "judged": self.share_group is not None},
            "policy": {"rounds": self.policy_rounds, "failures": self.policy_failures,
                       "rebirth_failures": self.rebirth_failures},
            "ingest": None if ingest is None else {**ingest.stats.as_dict(), "backlog": ingest.backlog},
            "transport": None if ingest is None else ingest.transport_status(),
            "commands": None if self.commands is None else dict(self.commands.counters),
            "rollouts": None if self.rollouts is None else dict(self.rollouts.counts),
            "events": self.events.stats.as_dict(),
            "alerts": None if self.alert_engine is None else self.alert_engine.status(),
            "audit": None if self.audit is None else {"errors": self.audit.errors},
            "web": None if self._web is None else {"logins_failed": self._web.logins_failed,
                                                   "tokens_refused": self._web.auth.refused},
            "store": None if store is None else {
                "commit_errors": store.db.commit_errors, "housekeeping_errors": store.db.housekeeping_errors,
                "checkpoint_errors": store.db.checkpoint_errors, "state_reloads": store.reloads},
        }

    # -- events ---------------------------------------------------------------------------------------------------
    def _on_connection(self, up: bool) -> None:
        self._broker_up = up  # as the loop learns it: a lead taken before this callback publishes here, not twice
        if up:
            if self.leader.is_leader:
                self.tasks.spawn(lambda: self._publish_policies(republish=True), "publish-policies",
                                 on_death="log", forever=False)
        elif self.share_group is None:  # under $share the other controllers still hear the devices
            self.tasks.spawn(self._mark_offline, "mark-offline", on_death="log", forever=False)

    def _on_leadership(self, leader: bool) -> None:
        """Taking the lead: republish the policies (the old leader may have died before publishing a change).
        The leader-only loops start and stop by themselves (Leadership.run_while_leader)."""
        if leader and self._broker_up:
            self.tasks.spawn(lambda: self._publish_policies(republish=True), "publish-policies", on_death="log",
                             forever=False)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """An alert or audit change (AlertStore, AuditLog): to the live dashboard, and to `on_event` when given."""
        self.events.publish(kind, data)
        if self._extra_on_event is not None:
            self._extra_on_event(kind, data)

    async def _mark_offline(self) -> None:
        assert self.store is not None
        self._publish_events(await asyncio.to_thread(self.store.mark_all, "offline", "controller_lost_broker"))

    def _publish_events(self, events: list[DeviceEvent]) -> None:
        """State changes the sweep or a lost broker made, to the live dashboard."""
        for ev in events:
            self.events.publish("device", {"device_id": ev.device_id, "state": ev.state, "reason": ev.reason})

    def _on_result(self, result: Any) -> None:
        if self.commands is not None:
            self.commands.on_result(result)

    def _on_outcome(self, outcome: BatchOutcome) -> None:
        assert self.commands is not None and self.ingest is not None
        for device_id in outcome.rebirth:
            self._ask_rebirth(device_id)
        # a new device needs its first policy; every birth (a `rebirth` of the same session too) gets its policy
        # again, live: that tells the device the controller listens (it replays its buffer then), restores a
        # retained copy a broker lost, and replaces a stray policy the device took (it applies the last received)
        fresh = set(outcome.new_devices) | set(outcome.births)
        if fresh:
            first = not self._pending_policy
            self._pending_policy.update(fresh)
            if first:
                self.tasks.spawn(lambda: self._publish_policies(delay=0.05), "publish-policies", on_death="log",
                                 forever=False)

    def _ask_rebirth(self, device_id: str) -> None:
        assert self.commands is not None and self.ingest is not None
        if self.ingest.client.connected:
            try:
                self.commands.fire(device_id, "rebirth")
            except (MqttError, CommandError) as exc:  # counted; the next gap asks again (REBIRTH_EVERY_MS)
                self.rebirth_failures += 1
                log.warning("controller: rebirth request to %s not sent: %s", device_id, exc)

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
        except (TimeoutError, MqttError) as exc:  # the next connect publishes (new_only) again
            self.policy_failures += 1
            log.warning("controller: policy publishing failed (%s: %s); retried on the next (re)connect",
                        type(exc).__name__, exc)
            return
        if changes:
            self.policy_rounds += 1
            log.info("published policy version %d to %d devices", version, len(changes))
            if self.audit is not None:
                self.audit.record_soon("controller", "policy_apply", f"v{version}", {
                    "version": version, "devices": sorted(c.device_id for c in changes)[:100],
                    "device_count": len(changes), "trigger": "reconnect" if republish else "birth"}, "controller")

    async def _sweep(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.sweep_every_s)
            events = await asyncio.to_thread(self.store.sweep_stale)
            for ev in events:
                self._nudges += 1
                log.info("device %s is stale (silent)", ev.device_id)
            self._publish_events(events)

    async def _gaps(self) -> None:
        """Under $share, on the leader: seq gaps judged from the stored rows (controller/gaps.py), a backlog in
        several bounded rounds; each device with missing seqs is asked for a rebirth (at most every 10 s)."""
        assert self.store is not None
        while True:
            await asyncio.sleep(self.gaps_every_s)
            while True:
                found = await asyncio.wrap_future(self.store.submit(self._judge_gaps))
                self.gap_rounds += 1
                missing = sum(found.missing.values())
                if missing:
                    self.gaps_found += missing
                    self._nudges += 1
                    log.info("controller: %d missing telemetry messages of %d devices judged from the store",
                             missing, len(found.missing))
                for device_id in gaps.devices_to_ask(found.missing, self._gap_asked, int(time.time() * 1000),
                                                     REBIRTH_EVERY_MS):
                    self._ask_rebirth(device_id)
                if found.caught_up:
                    break

    def _judge_gaps(self, conn: Any) -> gaps.GapRound:
        """One round, on the store's writer. SQLite's store keeps its devices in memory (controller.devstate) and
        writes their gap_count back on its next flush: the mirror takes the same increment in the same job."""
        found = gaps.judge(conn, settle_ms=self.gap_settle_ms)
        mirror = getattr(getattr(self.store, "_state", None), "devices", None)
        if isinstance(mirror, dict):
            for device_id, n in found.missing.items():
                if device_id in mirror:
                    mirror[device_id].gap_count += n
        return found

    async def _alerts(self) -> None:
        """The alert engine: every alerts_every_s, and right after ingest committed a batch or the sweep changed a
        device (the counters below move), so a device that heats shows a raised alert within about 0.3 s."""
        assert self.alert_engine is not None

        def changed() -> int:
            stats = self.ingest.stats if self.ingest is not None else None
            return self._nudges + (stats.batches + stats.rejected if stats is not None else 0)

        await self.alert_engine.run(every_s=self.alerts_every_s, changed=changed)

    # -- web ------------------------------------------------------------------------------------------------------
    async def _start_web(self, listen: str) -> None:
        import uvicorn

        from nanofleet.controller.artifacts import ArtifactStore
        from nanofleet.controller.auth import ensure_operator_token, read_operators
        from nanofleet.controller.web.app import create_app

        assert self.store is not None, "the store opens before the web app starts"
        token, token_hash = await asyncio.to_thread(ensure_operator_token, self.data_dir)
        operators = await asyncio.to_thread(read_operators, self.data_dir)
        if token:
            self.echo(f"operator token: {token}  (shown once; stored hashed in {self.data_dir})")
        app = create_app(self.store, self.config, operator_token_hash=token_hash, commands=self.commands,
                         usage_db=self.usage_db, status=self.status, alerts=self.alerts, audit=self.audit,
                         operators=operators, events=self.events,
                         artifacts=ArtifactStore(self.data_dir / "artifacts"))
        self._web = app.state.web
        host, port = listen.rsplit(":", 1)

        events = self.events

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the controller handles signals itself
                yield

            async def shutdown(self, sockets: Any = None) -> None:
                events.close()  # uvicorn waits for open responses: the /events streams must end first
                await super().shutdown(sockets)

        server = _Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning", access_log=False,
                                        lifespan="off"))
        self._server = server
        task = self.tasks.spawn(server.serve, "web", on_death="fatal")
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"dashboard did not start on {listen}")
            await asyncio.sleep(0.02)
        self.web_port = server.servers[0].sockets[0].getsockname()[1] if server.servers else int(port)
        self.echo(f"dashboard: http://{host}:{self.web_port}/")
