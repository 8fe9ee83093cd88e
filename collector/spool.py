"""The gateway's store-and-forward spool: what was polled, kept until delivered.

A gateway keeps polling while its uplink is down, so what it read must
outlive the outage, a restart and a power cut. SQLite in WAL mode with
`synchronous=FULL` gives exactly that: `put()` returns only after the
transaction is on disk. Readings leave the spool only through `ack()`, which
the uplink calls after the broker (PUBACK) or the database (COMMIT) has taken
them, so the cursor advances only on an acknowledged write.

The spool is bounded. When full it applies an explicit policy, counts what
it dropped in `amr_spool_dropped_total{policy}` and says so in the log:

- `drop_oldest`: make room by deleting the oldest readings (the newest data
  is the most useful to an operator watching a live gateway);
- `refuse_new`: keep what is there and refuse the new readings (the oldest
  data is never lost, which some audits demand).

One process owns a spool file; its threads share the one connection.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from adapters import quality
from adapters.reading import Reading, Rejected
from collector import metrics
from collector.errors import UserError

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "refuse_new")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    enqueued_at REAL NOT NULL,
    item        TEXT NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One spooled item with the id that `ack()` takes."""

    id: int
    item: Reading | Rejected


class SpoolError(UserError, ValueError):
    """A spool that cannot be opened as configured (the CLI prints it without a traceback)."""


def encode_item(item: Reading | Rejected, flag: str | None = None) -> str:
    """One item as compact JSON text: the spool's row and the uplink's wire form agree.

    `flag` adds a quality flag to a reading (the spool adds `spooled`), so the
    uplink can publish the stored text as it is.
    """
    if isinstance(item, Reading):
        return json.dumps(
            {
                "meter": item.meter_id,
                "register": item.register,
                "ts": item.ts.isoformat(),
                "value": str(item.value),
                "quality": sorted(item.quality | {flag} if flag else item.quality),
                "source": item.source,
            },
            separators=(",", ":"),
        )
    return json.dumps(
        {
            "rejected": True,
            "source": item.source,
            "reason": item.reason,
            "code": item.code,
            "raw": base64.b64encode(item.raw).decode("ascii"),
            "meter": item.meter_id,
            "register": item.register,
            "ts": item.ts.isoformat() if item.ts else None,
        },
        separators=(",", ":"),
    )


def decode_item(text: str) -> Reading | Rejected:
    """Inverse of `encode_item`."""
    d = json.loads(text)
    if d.get("rejected"):
        return Rejected(
            source=d["source"],
            raw=base64.b64decode(d["raw"]),
            reason=d["reason"],
            code=d["code"],
            meter_id=d.get("meter"),
            register=d.get("register"),
            ts=datetime.fromisoformat(d["ts"]) if d.get("ts") else None,
        )
    return Reading(
        d["meter"],
        d["register"],
        datetime.fromisoformat(d["ts"]),
        Decimal(d["value"]),
        frozenset(d.get("quality", ())),
        d.get("source", ""),
    )


class Spool:
    """A bounded, durable FIFO of readings (and rejects) on its way upstream.

    Use it as the gateway's sink: `put(items)` is durable on return.
    The uplink reads with `peek(n)` and removes with `ack(ids)`.
    """

    def __init__(self, path: Path | str, max_readings: int = 5_000_000, policy: str = "drop_oldest"):
        if policy not in POLICIES:
            raise SpoolError(f"spool policy {policy!r} unknown: use one of {', '.join(POLICIES)}")
        if max_readings <= 0:
            raise SpoolError(f"spool max_readings must be positive, got {max_readings}")
        self.path = Path(path)
        self.max_readings = max_readings
        self.policy = policy
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # durable at each commit, power loss too
            self._db.execute(_SCHEMA)
            self._count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from None
        self._update_gauges()

    # --- the gateway's side ---

    def put(self, items: Iterable[Reading | Rejected]) -> int:
        """Store items durably, in order; returns how many were kept.

        When the spool is full the configured policy applies; dropping is
        counted and logged, never silent.
        """
        now = time.time()
        rows = [(now, encode_item(it, quality.SPOOLED)) for it in items]
        if not rows:
            return 0
        with self._lock:
            dropped = 0
            room = self.max_readings - self._count
            if len(rows) > room:
                if self.policy == "refuse_new":
                    dropped = len(rows) - max(room, 0)
                    rows = rows[: max(room, 0)]
                else:
                    dropped = len(rows) - room
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if dropped and self.policy == "drop_oldest":
                    evict = min(dropped, self._count)
                    self._db.execute(
                        "DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY id LIMIT ?)",
                        (evict,),
                    )
                    self._count -= evict
                    if dropped > evict:  # one batch larger than the whole spool
                        rows = rows[dropped - evict :]
                if rows:
                    self._db.executemany("INSERT INTO spool (enqueued_at, item) VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += len(rows)
            self._update_gauges()
        if dropped:
            metrics.SPOOL_DROPPED.labels(self.policy).inc(dropped)
            what = "oldest readings dropped" if self.policy == "drop_oldest" else "new readings refused"
            log.warning(
                "spool %s full (%d readings): %d %s by policy %s",
                self.path, self.max_readings, dropped, what, self.policy,
            )
        return len(rows)

    # --- the uplink's side ---

    def peek(self, n: int) -> list[SpoolEntry]:
        """The oldest n entries, in the order they were put; nothing is removed."""
        with self._lock:
            cur = self._db.execute("SELECT id, item FROM spool ORDER BY id LIMIT ?", (n,))
            return [SpoolEntry(i, decode_item(text)) for i, text in cur]

    def peek_encoded(self, n: int) -> list[tuple[int, str]]:
        """Like `peek`, as the stored JSON text (what `encode_item` wrote): the uplink's fast path."""
        with self._lock:
            return self._db.execute("SELECT id, item FROM spool ORDER BY id LIMIT ?", (n,)).fetchall()

    def ack(self, ids: Iterable[int]) -> int:
        """Remove delivered entries (ids already gone are ignored); returns how many went."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                lo, hi = wanted[0], wanted[-1]
                if hi - lo + 1 == len(wanted):  # a run of ids, the usual case: one range delete
                    self._db.execute("DELETE FROM spool WHERE id BETWEEN ? AND ?", (lo, hi))
                else:
                    self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in wanted])
                removed = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= removed
            self._update_gauges()
        return removed

    def __len__(self) -> int:
        return self._count

    def oldest_age(self) -> float:
        """Seconds since the oldest waiting entry was put (0 when empty)."""
        with self._lock:
            row = self._db.execute("SELECT enqueued_at FROM spool ORDER BY id LIMIT 1").fetchone()
        return max(0.0, time.time() - row[0]) if row else 0.0

    def _update_gauges(self) -> None:
        metrics.SPOOL_DEPTH.set(self._count)
        if self._count == 0:
            metrics.SPOOL_OLDEST_AGE.set(0)
        else:
            row = self._db.execute("SELECT enqueued_at FROM spool ORDER BY id LIMIT 1").fetchone()
            metrics.SPOOL_OLDEST_AGE.set(max(0.0, time.time() - row[0]) if row else 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
