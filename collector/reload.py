"""Reload of inventory, presets and tariffs on SIGHUP: build, validate, swap.

A reload never half-happens. The new configuration is built completely and
validated (every meter's preset loaded, every file parsed) before anything
changes; only then is it swapped in, in one assignment, and the daemon is
told what changed (meters added, removed, changed). On any error the old
configuration stays in use and the error is logged with every problem it
found. Readings already read sit in queues and the spool, which a reload
does not touch, so none is lost: a removed meter's buffered readings still
go out.

Signal handlers only raise a flag (or schedule a task on the asyncio loop);
the work runs in the daemon's own thread, never inside the handler.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from collector import metrics
from collector.errors import UserError
from collector.inventory import Inventory, InventoryError, load_inventory

log = logging.getLogger("amr.reload")

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; `problems` names file, entry and key of each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the configuration:\n" + "\n".join(problems))


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a daemon reads from files and may reload: one immutable snapshot."""

    inventory: Inventory
    presets: Mapping[str, Any] = field(default_factory=dict)  # preset ref -> RegisterMap
    tariffs: Any = None  # billing.tariffs.Catalogue, when a tariff file is configured
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
    tariffs_changed: bool = False

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.tariffs_changed)

    def describe(self) -> str:
        parts = [f"{len(self.added)} meter(s) added", f"{len(self.removed)} removed", f"{len(self.changed)} changed"]
        if self.tariffs_changed:
            parts.append("tariffs changed")
        return ", ".join(parts)


def diff(old: RuntimeConfig | None, new: RuntimeConfig) -> ConfigChange:
    """Meters whose definition (or preset) differs between two snapshots."""
    old_meters = dict(old.meters) if old else {}
    new_meters = dict(new.meters)
    changed = set()
    for mid in old_meters.keys() & new_meters.keys():
        a, b = old_meters[mid], new_meters[mid]
        if a != b or (old and a.preset and old.presets.get(a.preset) != new.presets.get(b.preset)):
            changed.add(mid)
    tariffs_changed = bool(old) and _tariff_rows(old.tariffs) != _tariff_rows(new.tariffs)
    return ConfigChange(
        added=frozenset(new_meters.keys() - old_meters.keys()),
        removed=frozenset(old_meters.keys() - new_meters.keys()),
        changed=frozenset(changed),
        tariffs_changed=tariffs_changed,
    )


def _tariff_rows(catalogue: Any) -> Any:
    return None if catalogue is None else tuple(getattr(catalogue, "tariffs", catalogue))


def load_runtime_config(
    inventory: Path | str, tariffs: Path | str | None = None, *, preset_base: Path | None = None,
) -> RuntimeConfig:
    """Read and validate inventory, the presets its meters name, and the tariff file.

    Collects the problems of all three before refusing, so an operator fixes
    them in one round. Preset paths in the inventory are relative to the
    inventory's folder unless `preset_base` says otherwise.
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
    catalogue = None
    if tariffs:
        from billing.tariffs import Catalogue, TariffError, load_catalogue_file

        try:
            catalogue = Catalogue(load_catalogue_file(tariffs))
        except TariffError as exc:
            problems += exc.problems
    if problems or inv is None:
        raise ConfigError(problems or [f"{inventory}: could not be read"])
    return RuntimeConfig(inventory=inv, presets=presets, tariffs=catalogue)


def _preset_refs(path: Path | str, inv: Inventory | None) -> list[tuple[str, str, str | None]]:
    """(meter id, adapter, preset) of every meter, even from an inventory that failed validation,
    so that preset problems are reported in the same round as the others."""
    if inv is not None:
        return [(m.id, m.adapter, m.preset) for m in inv.meters.values()]
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []  # already reported by load_inventory
    entries = data.get("meter") if isinstance(data.get("meter"), list) else []
    return [
        (str(e.get("id")), str(e.get("adapter", "modbus_tcp")), e.get("preset") if isinstance(e.get("preset"), str) else None)
        for e in entries if isinstance(e, dict)
    ]


class Reloader(Generic[T]):
    """Holds the configuration in use and replaces it atomically on request.

    `load()` builds and validates a complete new configuration or raises;
    `apply(old, new)` (optional) tells the daemon, and may itself refuse by
    raising, in which case the old configuration stays. Readers take
    `reloader.current` once per unit of work and use that snapshot
    throughout, so no unit of work sees half of each.
    """

    def __init__(
        self, load: Callable[[], T], apply: Callable[[T | None, T], None] | None = None,
        *, name: str = "configuration", initial: T | None = None,
    ):
        self._load = load
        self._apply = apply
        self._name = name
        self._lock = threading.Lock()
        self._requested = threading.Event()
        self._tasks: set[asyncio.Task] = set()
        self._current: T | None = initial
        self.generation = 0
        self.last_error: str | None = None
        if initial is None:
            self._current = load()  # at start-up a bad configuration is fatal, and says why
            if apply is not None:
                apply(None, self._current)
        self._loaded(ok=True)

    @property
    def current(self) -> T:
        return self._current  # type: ignore[return-value]

    def _loaded(self, ok: bool) -> None:
        if ok:
            self.generation += 1
            metrics.CONFIG_LOADED_AT.set(time.time())
            meters = getattr(self._current, "meters", None)
            if isinstance(meters, Mapping):
                counts: dict[str, int] = {}
                for m in meters.values():
                    adapter = getattr(m, "adapter", "unknown")
                    counts[adapter] = counts.get(adapter, 0) + 1
                for adapter in ("modbus_tcp", "modbus_rtu", "iec62056", "mqtt", "manual", *counts):
                    metrics.METERS_CONFIGURED.labels(adapter=adapter).set(counts.get(adapter, 0))

    def reload(self) -> bool:
        """Build, validate, swap. True when the new configuration is in use."""
        self._requested.clear()
        try:
            new = self._load()
        except Exception as exc:  # keep running on the old configuration, say why
            return self._failed(exc)
        return self._swap_in(new)

    def _failed(self, exc: Exception) -> bool:
        problems = getattr(exc, "problems", None) or [str(exc)]
        self.last_error = "\n".join(problems)
        metrics.CONFIG_RELOADS.labels(outcome="error").inc()
        log.error(
            "%s reload refused, keeping the one in use (generation %d): %d problem(s): %s",
            self._name, self.generation, len(problems), "; ".join(problems),
            extra={"problems": problems},
        )
        return False

    # --- signals -----------------------------------------------------------------

    def request(self) -> None:
        """Ask for a reload (safe from a signal handler); `reload_if_requested` does it."""
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def reload_if_requested(self) -> bool | None:
        """For a daemon's own loop: reload when asked; None when nothing was asked."""
        if not self._requested.is_set():
            return None
        return self.reload()

    def install_sighup(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Reload on SIGHUP: on an asyncio loop as a task, otherwise by a flag the loop polls.

        With a loop, the new configuration is built in a worker thread and
        swapped in on the loop's thread, so the scheduler's state is only
        ever touched by the loop.
        """
        if loop is not None:
            def on_signal() -> None:
                task = loop.create_task(self.reload_async())
                self._tasks.add(task)  # keep a reference until it is done
                task.add_done_callback(self._tasks.discard)

            loop.add_signal_handler(signal.SIGHUP, on_signal)
        else:
            signal.signal(signal.SIGHUP, lambda signum, frame: self.request())

    async def reload_async(self) -> bool:
        """`reload()` for asyncio daemons: load in a thread, apply on the loop."""
        self._requested.clear()
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, self._load)
        except Exception as exc:
            return self._failed(exc)
        return self._swap_in(new)

    def _swap_in(self, new: T) -> bool:
        with self._lock:
            old = self._current
            try:
                if self._apply is not None:
                    self._apply(old, new)
            except Exception as exc:
                return self._failed(exc)
            self._current = new
            self._loaded(ok=True)
            self.last_error = None
            metrics.CONFIG_RELOADS.labels(outcome="ok").inc()
            log.info("%s reloaded (generation %d)", self._name, self.generation)
            return True


def install_collector_reload(consumer: Any, inventory: Path | str, settings: Any) -> Reloader[RuntimeConfig]:
    """SIGHUP for `amr collect`: new device map (and tariffs into the database), or nothing.

    The consumer's loop blocks, so the reload runs in a thread of its own;
    the swap is one attribute assignment that the consumer reads once per
    message. Messages in flight keep the map they were decoded with.
    """
    from adapters.mqtt_formats import DeviceMap

    def apply(old: RuntimeConfig | None, new: RuntimeConfig) -> None:
        if old is not None and new.tariffs is not None and diff(old, new).tariffs_changed:
            from billing.tariffs import store_catalogue
            from collector.storage import db

            with db.connect(settings.database_url) as conn:
                store_catalogue(conn, list(new.tariffs.tariffs))
                conn.commit()
        consumer.devices = DeviceMap(new.meters.values())
        if old is not None:
            log.info("collector configuration reloaded: %s", diff(old, new).describe())

    reloader: Reloader[RuntimeConfig] = Reloader(
        lambda: load_runtime_config(inventory, settings.tariffs), apply, name="collector configuration",
    )
    signal.signal(
        signal.SIGHUP,
        lambda signum, frame: threading.Thread(target=reloader.reload, name="amr-reload", daemon=True).start(),
    )
    return reloader
