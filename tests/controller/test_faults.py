"""Fault tests against real mosquitto, bounded in time: broker restart under 50 devices, malformed payloads on every
topic (hypothesis), a device that goes silent without a last will."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from agent_fleet import Simulation
from ctl_helpers import fleet, rejection_total, telemetry_keys, until, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanofleet.controller.service import ControllerService
from nanofleet.protos import fleet_pb2, topics


async def test_broker_restart_under_50_devices(make_broker, tmp_path: Path, reader: str) -> None:
    b = make_broker()
    svc = await ControllerService(fleet("flt1", b.url), tmp_path / "ctl", sweep_every_s=0.2,
                                  ingest_reader=reader).start()
    sim = await Simulation(b.url, 50, fleet="flt1", interval_s=0.2, data_dir=tmp_path / "sim",
                           backoff=(0.1, 1.0)).start()
    store = svc.store
    ids = [d.device_id for d in sim.devices]
    try:
        await until(lambda: sum(d.state == "online" for d in store.list_devices()) == 50, 20, "50 online")
        b.stop()
        await until(lambda: all(d.state == "offline" for d in store.list_devices()), 10, "all offline")
        await until(lambda: all(d.session._buffered >= 2 for d in sim.devices), 10, "samples buffered on disk")
        buffered: dict[str, set[int]] = {}
        for d in sim.devices:
            items = await asyncio.to_thread(d.session.buffer.peek, 1000)
            buffered[d.device_id] = {fleet_pb2.Telemetry.FromString(p).ts_ms for _, p in items}
        b.start()
        await until(lambda: sum(d.state == "online" for d in store.list_devices()) == 50, 30, "50 online again")

        def replayed() -> bool:
            have: dict[str, set[int]] = {}
            for dev, _, _, ts in telemetry_keys(store):
                have.setdefault(dev, set()).add(ts)
            return all(buffered[d] <= have.get(d, set()) for d in ids)

        try:
            await until(replayed, 30, "every buffered sample stored")
        except AssertionError:
            have: dict[str, set[int]] = {}
            for dev, _, _, ts in telemetry_keys(store):
                have.setdefault(dev, set()).add(ts)
            missing = {d: sorted(buffered[d] - have.get(d, set())) for d in ids if buffered[d] - have.get(d, set())}
            diag = [(d.device_id, d.session.client.connects, d.session._listening_conn) for d in sim.devices
                    if d.device_id in missing]
            raise AssertionError(f"missing {len(missing)}: {list(missing.items())[:2]}; {svc.ingest.stats}; "
                                 f"ctl connects {svc.ingest.subscriber.connects}; {diag}") from None
        for device_id in ids:
            states = [(e.state, e.reason) for e in store.device_events(device_id)]
            # offline: the controller lost the broker (or, if mosquitto sent it while shutting down, the last will)
            lost = next(i for i, s in enumerate(states) if s in (("offline", "controller_lost_broker"),
                                                                   ("offline", "last_will")))
            assert ("online", "birth") in states[lost + 1:], (device_id, states)
        keys = telemetry_keys(store)
        assert len({(d, ts) for d, _, _, ts in keys}) == len(keys)  # no sample stored twice
        assert all(d.session.client.connects == 2 for d in sim.devices)
    finally:
        await sim.stop()
        await svc.stop()


async def test_silent_device_without_last_will_goes_stale(broker, tmp_path: Path, reader: str) -> None:
    svc = await ControllerService(fleet("flt3", broker.url), tmp_path / "ctl", sweep_every_s=0.1,
                                  ingest_reader=reader).start()
    sim = await Simulation(broker.url, 2, fleet="flt3", interval_s=0.2, data_dir=tmp_path / "sim").start()
    store = svc.store
    try:
        await until(lambda: sum(d.state == "online" for d in store.list_devices()) == 2, 10, "2 online")
        interval = store.get_device("sim-0000").telemetry_interval_s
        sim.devices[0].session.paused = True  # connection stays up (pings continue): no last will
        loop = asyncio.get_running_loop()
        start = loop.time()
        await until(lambda: store.get_device("sim-0000").state == "stale", 4 * interval + 2, "stale")
        assert loop.time() - start >= 2.5 * interval - 0.5
        assert store.device_events("sim-0000")[-1].reason == "silent"
        assert store.get_device("sim-0001").state == "online"
        sim.devices[0].session.paused = False
        await until(lambda: store.get_device("sim-0000").state == "online", 5, "back online")
    finally:
        await sim.stop()
        await svc.stop()


class _Controller:
    """A ControllerService on its own event loop thread, so a synchronous hypothesis test can drive it."""

    def __init__(self, broker_url: str, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.svc = self._run(ControllerService(fleet("flt2", broker_url), data_dir).start())
        self._run(self.svc.ingest.wait_subscribed(5))

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self._run(self.svc.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def controller(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Controller]:
    c = _Controller(broker.url, tmp_path_factory.mktemp("flt2"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def publisher(broker) -> Iterator[paho.Client]:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    yield c
    c.disconnect()
    c.loop_stop()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                  max_size=3),
                     max_leaves=5)
malformed = st.one_of(
    st.binary(min_size=1, max_size=64).filter(lambda b: not _is_object(b)),  # not JSON, or JSON but not an object
    st.builds(lambda d, k, v: json.dumps({**d, f"x_{k}": v}).encode(),  # an unknown field
              st.dictionaries(st.sampled_from(["tsMs", "bdSeq", "id"]), st.integers(1, 9), max_size=2),
              st.text("abc", min_size=1, max_size=4), _json),
    st.builds(lambda k, v: json.dumps({k: v}).encode(),  # a known field with a value of the wrong type
              st.sampled_from(["bdSeq", "tsMs", "deviceId", "online", "status"]), st.lists(st.integers(), max_size=2)),
)


def _is_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except (ValueError, RecursionError):
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["status", "telemetry", "cmd/result"]), payload=malformed,
       device=st.sampled_from(["m1", "m2", "m3"]))
def test_malformed_payloads_on_every_topic_are_rejected_and_counted(controller: _Controller, publisher: paho.Client,
                                                                    kind: str, payload: bytes, device: str) -> None:
    store, stats = controller.svc.store, controller.svc.ingest.stats
    before = (stats.rejected, rejection_total(store))
    publisher.publish(topics.topic("flt2", device, kind), payload, qos=1).wait_for_publish(5)  # type: ignore[arg-type]
    wait_for(lambda: (stats.rejected, rejection_total(store)) == (before[0] + 1, before[1] + 1), 10,
             what=f"{payload!r} on {kind} rejected and counted")
    assert stats.rejected_by_reason.total() == stats.rejected
    assert {r.device_id for r in store.rejections(1000)} <= {"m1", "m2", "m3"}


def test_ingest_keeps_going_after_malformed_payloads(controller: _Controller, publisher: paho.Client) -> None:
    """On its own (any order, `-k`): three bad payloads, then a good one is stored and shown."""
    store, stats = controller.svc.store, controller.svc.ingest.stats
    before = (stats.rejected, stats.stored)
    for bad in (b"{oops", b"[]", b'{"tsMs": "1", "x_unknown": 1}'):
        publisher.publish(topics.telemetry("flt2", "g1"), bad, qos=1).wait_for_publish(5)
    good = json.dumps({"tsMs": "1000", "seq": 0, "cpuPercent": 5}).encode()
    publisher.publish(topics.telemetry("flt2", "g1"), good, qos=1).wait_for_publish(5)
    wait_for(lambda: (stats.rejected - before[0], stats.stored - before[1]) == (3, 1), 10, what="3 rejected, 1 stored")
    assert telemetry_keys(store, "g1") and store.get_device("g1").cpu_percent == 5
