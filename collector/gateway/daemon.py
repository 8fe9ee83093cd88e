"""The gateway daemon: the scheduler over the whole inventory, into a sink.

Where the readings go is a deployment choice:
- with a spool path and an uplink (the distributed deployment, or any
  gateway that must survive a network or database outage), readings go into
  the local SQLite spool and the uplink drains it to MQTT (when AMR_MQTT_URL
  is set) or to the database;
- `direct`: straight into the ingestion entry point, in batches (the
  all-in-one deployment, tests, benchmarks).

The inventory is checked completely before the first poll: a broken file is
refused with the file, the meter and the reason, never half-polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters.base import PollingAdapter
from adapters.reading import Reading, Rejected
from adapters.registermap import check_modbus_meters
from amr.reload import Reloader
from amr.settings import Settings, get_settings
from collector.config import RuntimeConfig
from collector.gateway.scheduler import Scheduler, Sink
from collector.inventory import Inventory, InventoryError, load_inventory

log = logging.getLogger("amr.gateway")

POLLED_ADAPTERS = ("modbus_tcp", "modbus_rtu", "iec62056", "mercury230", "mercury200", "dlms")


def check_inventory(path: Path | str) -> Inventory:
    """Load the inventory and check every polled meter against its adapter; refuse with all problems."""
    return load_gateway_config(path).inventory


def load_gateway_config(path: Path | str) -> RuntimeConfig:
    """The gateway's configuration, each file read once: the inventory, checked against the
    adapters (every polled meter, its preset, its bus), and the presets it names.

    Refuses with every problem (InventoryError). At start and on every reload;
    the presets go to the adapters (`Adapters.use_presets`), which read no file
    again.
    """
    inv = load_inventory(path)
    maps: dict[str, Any] = {}
    problems = check_modbus_meters(inv.meters.values(), str(path), Path(path).resolve().parent, maps)
    iec = [m for m in inv.meters.values() if m.adapter == "iec62056"]
    if iec:
        from adapters.iec62056 import check_meter

        problems += [f"{path}: meter {m.id!r}: {p}" for m in iec for p in check_meter(m)]
    dlms = [m for m in inv.meters.values() if m.adapter == "dlms"]
    if dlms:
        from adapters.dlms import check_meter as check_dlms

        problems += [f"{path}: meter {m.id!r}: {p}" for m in dlms for p in check_dlms(m)]
    mercury = [m for m in inv.meters.values() if m.adapter in ("mercury230", "mercury200")]
    if mercury:
        from adapters.mercury_adapter import check_meter as check_mercury

        problems += [f"{path}: meter {m.id!r}: {p}" for m in mercury for p in check_mercury(m)]
    if inv.mqtt_layouts or any(m.adapter == "mqtt" for m in inv.meters.values()):
        from adapters.mqtt_formats import check_mqtt

        # topics, formats and payload keys of MQTT meters
        problems += [f"{path}: {p}" for p in check_mqtt(inv.meters.values(), inv.mqtt_layouts)]
    # one serial port speaks one protocol: two adapters would talk over each other
    protocol_of_port: dict[str, tuple[str, str]] = {}
    for m in inv.meters.values():
        if m.adapter in ("modbus_rtu", "iec62056", "dlms", "mercury230", "mercury200") and isinstance(m.port, str):
            first = protocol_of_port.setdefault(m.port, (m.adapter, m.id))
            if first[0] != m.adapter and {first[0], m.adapter} != {"mercury230", "mercury200"}:  # one Mercury link reads both
                problems.append(
                    f"{path}: meter {m.id!r}: key 'port': {m.port} is a {first[0]} bus (meter {first[1]!r}); "
                    f"one port cannot carry {m.adapter} too"
                )
    if problems:
        raise InventoryError(problems)
    return RuntimeConfig(inventory=inv, presets={ref: m for ref, m in maps.items() if m is not None})


class Adapters:
    """One adapter per protocol, shared by all meters of that protocol (they share ports)."""

    def __init__(self, settings: Settings, base_dir: Path | None = None,
                 presets: Mapping[str, Any] | None = None):
        self.settings = settings
        self.base_dir = base_dir
        self.presets = presets  # preset ref -> RegisterMap, loaded with the inventory
        self._made: dict[str, PollingAdapter] = {}

    def __call__(self, meter: Any) -> PollingAdapter:
        kind = "modbus" if meter.adapter.startswith("modbus") else "mercury" if meter.adapter.startswith("mercury") else meter.adapter
        got = self._made.get(kind)
        if got is None:
            if kind == "modbus":
                from adapters.modbus import ModbusAdapter

                modbus = ModbusAdapter(self.settings, base_dir=self.base_dir)
                if self.presets is not None:
                    modbus.use_maps(self.presets)
                got = modbus
            elif kind == "iec62056":
                from adapters.iec62056 import Iec62056Adapter

                got = Iec62056Adapter(self.settings)
            elif kind == "dlms":
                from adapters.dlms import DlmsAdapter

                got = DlmsAdapter(self.settings)
            elif kind == "mercury":
                from adapters.mercury_adapter import MercuryAdapter

                got = MercuryAdapter(self.settings)
            else:
                raise ValueError(f"meter {meter.id}: adapter {meter.adapter!r} is not polled")
            self._made[kind] = got
        return got

    def use_presets(self, presets: Mapping[str, Any]) -> None:
        """The presets of the configuration in use (loaded with it): Modbus reads no file again."""
        self.presets = presets
        modbus = self._made.get("modbus")
        if modbus is not None:
            modbus.use_maps(presets)  # type: ignore[attr-defined]

    async def close(self) -> None:
        for a in self._made.values():
            await a.close()
        self._made.clear()


class IngestSink:
    """Straight into the ingestion entry point (one transaction per batch)."""

    def __init__(self, database_url: str, settings: Settings | None = None, batch: int = 5000):
        from amr.storage import db
        from collector.ingest.ingestor import Ingestor

        self.conn = db.connect(database_url)
        self.ingestor = Ingestor(self.conn, settings)
        self.batch = batch
        self.accepted = 0

    def put(self, items: list[Reading | Rejected]) -> None:
        for i in range(0, len(items), self.batch):
            result = self.ingestor.ingest(items[i : i + self.batch])
            self.accepted += result.accepted

    def close(self) -> None:
        self.conn.close()


class SpoolSink:
    """Into the gateway spool; the uplink thread drains it (store and forward)."""

    def __init__(self, settings: Settings):
        from collector.gateway.spool import Spool
        from collector.gateway.uplink import IngestForwarder, MqttForwarder, Uplink

        self.spool = Spool(settings.spool_path, settings.spool_max_readings, settings.spool_full_policy)
        if settings.mqtt_url:
            from collector.mqtt.client import broker_from_settings

            forwarder: Any = MqttForwarder(broker_from_settings(settings))
        elif settings.database_url:
            forwarder = IngestForwarder(settings.database_url, settings)
        else:
            raise InventoryError(["set AMR_MQTT_URL or AMR_DATABASE_URL: the spool needs somewhere to drain to"])
        self.uplink = Uplink(self.spool, forwarder)
        self.uplink.start()

    def put(self, items: list[Reading | Rejected]) -> None:
        self.spool.put(items)
        self.uplink.notify()

    def close(self, drain_s: float = 10.0) -> None:
        """Give the uplink a moment to deliver what is queued; the rest waits in the spool."""
        import time

        deadline = time.monotonic() + drain_s
        while len(self.spool) and time.monotonic() < deadline:
            self.uplink.notify()
            time.sleep(0.05)
        self.uplink.stop()
        self.spool.close()


def make_sink(settings: Settings, mode: str) -> Any:
    """mode: spool (spool + uplink) or direct (ingestion in batches)."""
    if mode == "direct":
        if not settings.database_url:
            raise InventoryError(["AMR_DATABASE_URL is not set: direct mode writes to the database"])
        return IngestSink(settings.database_url, settings)
    return SpoolSink(settings)


async def run_gateway(
    inventory_path: Path | str,
    sink: Sink,
    settings: Settings | None = None,
    *,
    stop: asyncio.Event | None = None,
    cycles: int | None = None,
    scheduler_options: dict[str, Any] | None = None,
    on_scheduler: Callable[[Scheduler], None] | None = None,
    config: RuntimeConfig | None = None,
    first_now: bool = False,
) -> Scheduler:
    """Poll every meter of the inventory until stop is set (SIGTERM/SIGINT set it too).

    `first_now` (`amr gateway --now`): a first pass over every meter at once,
    then the slots; the waits are told in the settings' zone.

    `config`: the configuration already loaded from `inventory_path` (by the
    command, which refuses a broken one before opening anything), so that a
    start reads each file once; SIGHUP loads it again.
    """
    settings = settings or get_settings()
    config = config or load_gateway_config(inventory_path)
    meters = [m for m in config.meters.values() if m.adapter in POLLED_ADAPTERS and m.removed is None]
    adapters = Adapters(settings, Path(inventory_path).resolve().parent, config.presets)
    # a spooling gateway keeps its back-fill positions beside its spool, so a reboot is back-filled too
    keep = {"backfill_state": settings.spool_path.with_name("backfill-state.json")} if isinstance(sink, SpoolSink) else {}
    sched = Scheduler(meters, adapters, sink, **{"timezone": settings.timezone, **keep, **(scheduler_options or {})})
    if on_scheduler:
        on_scheduler(sched)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def apply(old: RuntimeConfig | None, new: RuntimeConfig) -> None:
        if old is None:
            return
        adapters.use_presets(new.presets)  # as loaded with the new inventory; plans made afresh
        sched.replace_meters([m for m in new.meters.values() if m.adapter in POLLED_ADAPTERS and m.removed is None])
        log.info("configuration reloaded: %d meters polled", len(sched.meters))

    reloader = Reloader(lambda: load_gateway_config(inventory_path), apply,
                        name="gateway configuration", initial=config)

    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        reloader.install_sighup(loop)  # build and check off the loop, swap on it; a bad file keeps the old
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        pass
    log.info("gateway polling %d meters from %s", len(meters), inventory_path)
    # a spooling gateway has no database to ask: it counts its own silent meters
    # (in direct mode the /metrics refresher counts the fleet from the database)
    stale_task = None if isinstance(sink, IngestSink) else loop.create_task(_count_stale(sched, stop))
    try:
        await sched.run(stop, cycles, first_now=first_now)
    finally:
        if stale_task is not None:
            stale_task.cancel()
        await adapters.close()
    return sched


async def _count_stale(sched: Scheduler, stop: asyncio.Event, every_s: float = 5.0) -> None:
    """amr_meters_stale for this gateway: meters not read for more than two intervals."""
    from amr import metrics
    from collector.fleet import STALE_AFTER_INTERVALS

    started = sched.now()
    while not stop.is_set():
        now = sched.now()
        metrics.METERS_STALE.set(sum(
            1 for m in sched.meters
            if (sched.state[m.id].last_ok or started) < now - STALE_AFTER_INTERVALS * m.interval
        ))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
