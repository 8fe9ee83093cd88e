"""Reload on SIGHUP, for every daemon: build, validate, swap.

A reload never half-happens. The new configuration is built completely and
validated before anything changes; only then is it swapped in, in one
assignment, and the daemon is told (`apply(old, new)`). On any error the old
configuration stays in use and the error is logged with every problem it
found. What a configuration holds is each daemon's business (the collector's
for the gateway and the MQTT collector, billing's for the API's tokens).

Signal handlers only raise a flag (or schedule a task on the asyncio loop);
the work runs in the daemon's own thread, never inside the handler.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from amr import metrics
from amr.errors import ProblemsError

log = logging.getLogger("amr.reload")

T = TypeVar("T")


class ConfigError(ProblemsError):
    """A configuration that cannot be used; `problems` names file, entry and key of each."""

    what = "the configuration"

    def __str__(self) -> str:
        return self.describe()


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
        problems = exc.problems if isinstance(exc, ProblemsError) else [str(exc)]
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
