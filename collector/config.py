"""What the gateway and the collector load from files and reload on SIGHUP.

The mechanism (build completely, validate, swap in one step, or keep the old
one and say why) is amr.reload's; this is what is loaded: the inventory and
the register-map presets its meters name, and what changed between two loads
(meters added, removed, changed). Readings already read sit in queues and the spool, which a reload
does not touch, so none is lost: a removed meter's buffered readings still
go out.
"""

from __future__ import annotations

import logging
import signal
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from amr.reload import ConfigError, Reloader
from collector.inventory import Inventory, InventoryError, load_inventory

log = logging.getLogger("amr.reload")


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a daemon reads from files and may reload: one immutable snapshot."""

    inventory: Inventory
    presets: Mapping[str, Any] = field(default_factory=dict)  # preset ref -> RegisterMap
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def meters(self) -> Mapping[str, Any]:
        return self.inventory.meters


@dataclass(frozen=True)
class ConfigChange:
    """What a reload changed, by meter id, for the scheduler to act on."""

    added: frozenset[str]
    removed: frozenset[str]
    changed: frozenset[str]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def describe(self) -> str:
        return f"{len(self.added)} meter(s) added, {len(self.removed)} removed, {len(self.changed)} changed"


def diff(old: RuntimeConfig | None, new: RuntimeConfig) -> ConfigChange:
    """Meters whose definition (or preset) differs between two snapshots."""
    old_meters = dict(old.meters) if old else {}
    new_meters = dict(new.meters)
    changed = set()
    for mid in old_meters.keys() & new_meters.keys():
        a, b = old_meters[mid], new_meters[mid]
        if a != b or (old and a.preset and old.presets.get(a.preset) != new.presets.get(b.preset)):
            changed.add(mid)
    return ConfigChange(
        added=frozenset(new_meters.keys() - old_meters.keys()),
        removed=frozenset(old_meters.keys() - new_meters.keys()),
        changed=frozenset(changed),
    )


def load_runtime_config(
    inventory: Path | str, *, preset_base: Path | None = None,
) -> RuntimeConfig:
    """Read and validate the inventory and the presets its meters name, each file once.

    Collects the problems of both before refusing, so an operator fixes
    them in one round. Preset paths in the inventory are relative to the
    inventory's folder unless `preset_base` says otherwise. (Tariffs are
    billing's: `amr tariffs load`.)
    """
    from adapters.registermap import RegisterMapError, load_register_map

    problems: list[str] = []
    inv: Inventory | None = None
    try:
        inv = load_inventory(inventory)
    except InventoryError as exc:
        problems += exc.problems
    presets: dict[str, Any] = {}
    base = preset_base or Path(inventory).resolve().parent
    for meter_id, adapter, ref in _preset_refs(inventory, inv):
        if adapter in ("modbus_tcp", "modbus_rtu") and not ref:
            problems.append(f"{inventory}: meter {meter_id!r}: key 'preset': a Modbus meter needs a register map")
            continue
        if not ref or ref in presets:
            continue
        try:
            presets[ref] = load_register_map(ref, base)
        except RegisterMapError as exc:
            problems += [f"{inventory}: meter {meter_id!r}: key 'preset': {p}" for p in exc.problems]
    if problems or inv is None:
        raise ConfigError(problems or [f"{inventory}: could not be read"])
    return RuntimeConfig(inventory=inv, presets=presets)


def _preset_refs(path: Path | str, inv: Inventory | None) -> list[tuple[str, str, str | None]]:
    """(meter id, adapter, preset) of every meter, even from an inventory that failed validation,
    so that preset problems are reported in the same round as the others."""
    if inv is not None:
        return [(m.id, m.adapter, m.preset) for m in inv.meters.values()]
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []  # already reported by load_inventory
    raw = data.get("meter")
    entries: list[Any] = raw if isinstance(raw, list) else []
    return [
        (str(e.get("id")), str(e.get("adapter", "modbus_tcp")), e.get("preset") if isinstance(e.get("preset"), str) else None)
        for e in entries if isinstance(e, dict)
    ]


def install_collector_reload(consumer: Any, inventory: Path | str, settings: Any) -> Reloader[RuntimeConfig]:
    """SIGHUP for `amr collect`: a new device map from the inventory, or nothing.

    The consumer's loop blocks, so the reload runs in a thread of its own;
    the swap is one attribute assignment that the consumer reads once per
    message. Messages in flight keep the map they were decoded with.
    """
    from adapters.mqtt_formats import DeviceMap

    def apply(old: RuntimeConfig | None, new: RuntimeConfig) -> None:
        consumer.devices = DeviceMap(new.meters.values(), new.inventory.mqtt_layouts)
        if old is not None:
            log.info("collector configuration reloaded: %s", diff(old, new).describe())

    reloader: Reloader[RuntimeConfig] = Reloader(
        lambda: load_runtime_config(inventory), apply, name="collector configuration",
    )
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: threading.Thread(target=reloader.reload, name="amr-reload", daemon=True).start(),
    )
    return reloader
