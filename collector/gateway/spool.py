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

The spool survives damage (a power cut on a card that lies about syncing, a
full or failing disk, a file copied half-way):

- each row carries a CRC-32 of its text, so a row whose bytes changed on disk
  is found when it is read back, not stored as a wrong value; such a row, or
  one that does not decode, is replaced in place by a `Rejected` carrying its
  raw bytes (code `malformed`), so it ends in `rejected_reading` and costs
  that row only, not the batch it would have travelled in;
- a file SQLite cannot open or that fails `PRAGMA quick_check` at start is
  moved aside (`<name>.corrupt-<UTC time>`, with its -wal and -shm), every row
  still readable in it is copied into a fresh spool (`salvage_rows` reads the
  pages itself, the write-ahead log included, so a garbage header or a broken
  b-tree page costs the rows on the broken pages, not the file), and one log
  line and amr_spool_damaged_total / amr_spool_salvaged_total{outcome} say
  how many rows were salvaged and how many lost. The gateway goes on polling.
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from adapters import quality
from adapters.reading import Reading, Rejected
from adapters.wire import decode_item, encode_item
from amr import metrics
from amr.errors import UserError

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "refuse_new")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    enqueued_at REAL NOT NULL,
    item        TEXT NOT NULL,
    crc         INTEGER
)
"""
# SQLite's primary result codes that mean the file itself is damaged (not locked, not a permission)
_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_IOERR_SHORT_READ = 11, 26, 522
MAX_RAW_KEPT = 64 * 1024  # raw bytes kept in the reject that replaces an unreadable row


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One spooled item with the id that `ack()` takes."""

    id: int
    item: Reading | Rejected


class SpoolError(UserError, ValueError):
    """A spool that cannot be opened as configured (the CLI prints it without a traceback)."""


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
        self.salvage: Salvage | None = None  # what opening found and did, when the file was damaged
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        damage = find_damage(self.path)
        if damage is not None:
            self.salvage = salvage_spool(self.path, damage)
        try:
            self._db = self._connect(self.path)
            self._count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from None
        self._update_gauges()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # durable at each commit, power loss too
        db.execute(_SCHEMA)
        if "crc" not in {r[1] for r in db.execute("PRAGMA table_info(spool)")}:
            db.execute("ALTER TABLE spool ADD COLUMN crc INTEGER")  # a spool of an earlier version
        return db

    # --- the gateway's side ---

    def put(self, items: Iterable[Reading | Rejected]) -> int:
        """Store items durably, in order; returns how many were kept.

        When the spool is full the configured policy applies; dropping is
        counted and logged, never silent.
        """
        now = time.time()
        texts = [encode_item(it, quality.SPOOLED) for it in items]
        rows = [(now, t, zlib.crc32(t.encode())) for t in texts]
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
                    self._db.executemany("INSERT INTO spool (enqueued_at, item, crc) VALUES (?, ?, ?)", rows)
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
        """The oldest n entries, in the order they were put; nothing is removed.

        A row that does not read back is replaced by a reject first (see `peek_encoded`).
        """
        with self._lock:
            rows = self._head(n)
            out: list[SpoolEntry] = []
            bad: list[tuple[int, bytes, str]] = []
            for i, text in rows:
                try:
                    out.append(SpoolEntry(i, decode_item(text)))
                except Exception as exc:  # a CRC that matches text no encode_item wrote
                    bad.append((i, text.encode(), f"it does not decode: {_short(exc)}"))
            if bad:
                fixed = dict(self._replace_unreadable(bad))
                out = sorted(out + [SpoolEntry(i, decode_item(fixed[i])) for i, _, _ in bad], key=lambda e: e.id)
            return out

    def peek_encoded(self, n: int) -> list[tuple[int, str]]:
        """Like `peek`, as the stored JSON text (what `encode_item` wrote): the uplink's fast path.

        Each row's CRC is checked (one C call a row, no JSON decode); a row whose
        bytes changed on disk, or an older row without a CRC that does not
        decode, is replaced in place by a reject carrying its raw bytes, so it
        travels alone to `rejected_reading` and the rest of its batch as usual.
        """
        with self._lock:
            return self._head(n)

    def _head(self, n: int) -> list[tuple[int, str]]:
        rows = self._db.execute("SELECT id, CAST(item AS BLOB), crc FROM spool ORDER BY id LIMIT ?", (n,)).fetchall()
        out: list[tuple[int, str]] = []
        bad: list[tuple[int, bytes, str]] = []
        crc32 = zlib.crc32
        for i, raw, crc in rows:
            if crc is not None and crc32(raw) == crc:
                out.append((i, raw.decode()))
                continue
            why = _unreadable(raw, crc)
            if why is None:
                out.append((i, raw.decode()))
            else:
                bad.append((i, raw, why))
        if bad:
            out = sorted(out + self._replace_unreadable(bad))
        return out

    def _replace_unreadable(self, bad: list[tuple[int, bytes, str]]) -> list[tuple[int, str]]:
        """Rewrite each unreadable row as a reject with its raw bytes, in its place; the new rows' text."""
        now = []
        for i, raw, why in bad:
            rej = Rejected(f"spool:{self.path.name}", raw[:MAX_RAW_KEPT],
                           f"spool row {i} could not be read back ({why}); its raw bytes are kept", "malformed")
            text = encode_item(rej)
            now.append((i, text, zlib.crc32(text.encode())))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("UPDATE spool SET item = ?, crc = ? WHERE id = ?", [(t, c, i) for i, t, c in now])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        metrics.SPOOL_SALVAGED.labels("undecodable").inc(len(bad))
        log.warning("spool %s: %d row(s) could not be read back (row %d: %s); each goes on alone as a reject "
                    "with its raw bytes, the rest of the batch as usual", self.path, len(bad), bad[0][0], bad[0][2])
        return [(i, t) for i, t, _ in now]

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


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreadable(raw: bytes, crc: int | None) -> str | None:
    """Why a stored row cannot be forwarded as it is, or None when it can."""
    if crc is not None:
        return "its CRC does not match: its bytes changed on disk"
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        return f"it is not UTF-8 text (byte {exc.start})"
    try:
        decode_item(text)  # a row from before rows had a CRC: the decode is the check
    except Exception as exc:
        return f"it does not decode: {_short(exc)}"
    return None


# --- damage: find it at start, move the file aside, salvage what is readable ---


@dataclass
class Salvage:
    """What opening a damaged spool did: for the log line, the metrics and the tests."""

    damage: str  # why the file was taken for damaged
    moved_to: Path | None = None  # where the damaged file (and its -wal, -shm) now is
    salvaged: int = 0  # rows copied into the fresh spool
    lost: int = 0  # rows known to have been there and not readable (an estimate: ids missing in between)
    unreadable_pages: int = 0
    may_repeat: bool = False  # pages of unknown standing were read: some rows may be ones already delivered


def find_damage(path: Path) -> str | None:
    """Why the spool file at `path` cannot be trusted, or None (no file yet, or sound).

    Opened read-only, so looking changes nothing (no checkpoint on close). A
    file that cannot be opened for another reason (a permission, a lock) is
    not damage: opening it for real reports that.
    """
    if not path.exists():
        return None
    wal = Path(f"{path}-wal")
    if path.stat().st_size == 0:
        if wal.exists() and wal.stat().st_size > 0:
            return "the file is empty (0 bytes) beside a write-ahead log"
        return "the file is empty (0 bytes)"
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = db.execute("PRAGMA quick_check").fetchall()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or code == _SQLITE_IOERR_SHORT_READ):
            return _short(exc)
        if "malformed" in str(exc) or "not a database" in str(exc):
            return _short(exc)
        return None
    if found != [("ok",)]:
        lines = [line.strip() for r in found for line in str(r[0]).splitlines() if line.strip()]
        text = "; ".join(line for line in lines if not line.startswith("***"))[:200]
        return text or "PRAGMA quick_check failed"
    if tables and "spool" not in tables:
        return None  # another program's database: opening it adds our table, nothing to salvage
    return None


def salvage_spool(path: Path, damage: str) -> Salvage:
    """Move a damaged spool aside and copy every readable row into a fresh spool at `path`.

    Rows keep their ids, enqueue times, text and CRC; a row whose text was
    damaged in place is copied too and becomes a reject when it is read back.
    Logged in one line and counted in amr_spool_damaged_total and
    amr_spool_salvaged_total{outcome="salvaged"|"lost"}.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):  # the log first: a crash in between leaves the main file in place
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, f"{aside}{suffix}")
    result = Salvage(damage=damage, moved_to=aside)
    fresh = Spool._connect(path)
    try:
        try:
            found = salvage_rows(aside)
        except Exception:  # a bug here must not keep the gateway from polling: the file is kept aside
            log.exception("spool %s: salvaging %s failed; starting with an empty spool", path, aside)
            found = _Found(bounded=False)
        fresh.execute("BEGIN IMMEDIATE")
        insert = "INSERT OR IGNORE INTO spool (id, enqueued_at, item, crc) VALUES (?, ?, ?, ?)"
        chunk: list[tuple] = []
        for rowid, at, item, crc in found.rows:
            try:  # text as put() stores it; bytes that are not UTF-8 stay bytes (and become a reject when read)
                chunk.append((rowid, at, item.decode(), crc))
            except UnicodeDecodeError:
                chunk.append((rowid, at, item, crc))
            if len(chunk) >= 10_000:
                fresh.executemany(insert, chunk)
                chunk.clear()
        if chunk:
            fresh.executemany(insert, chunk)
        result.salvaged = fresh.execute("SELECT count(*) FROM spool").fetchone()[0]
        top = max(found.seq or 0, found.max_id or 0)
        if top:  # new rows continue after the highest id the damaged file knew
            fresh.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'spool'", (top,))
            fresh.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'spool', ? WHERE NOT EXISTS "
                          "(SELECT 1 FROM sqlite_sequence WHERE name = 'spool')", (top,))
        fresh.execute("COMMIT")
    finally:
        fresh.close()
    result.lost = found.lost_estimate(result.salvaged)
    result.unreadable_pages = found.unreadable_pages
    result.may_repeat = found.may_repeat
    metrics.SPOOL_DAMAGED.inc()
    metrics.SPOOL_SALVAGED.labels("salvaged").inc(result.salvaged)
    metrics.SPOOL_SALVAGED.labels("lost").inc(result.lost)
    log.error(
        "spool %s is damaged (%s): salvaged %d readings into a fresh spool, lost %s%s; the damaged file is "
        "kept as %s; polling goes on", path, damage, result.salvaged,
        f"{result.lost}" if found.bounded else f"{result.lost} or more (how many it held is unknown)",
        f" ({found.unreadable_pages} unreadable pages)" if found.unreadable_pages else "",
        aside, extra={"salvaged": result.salvaged, "lost": result.lost},
    )
    if result.may_repeat:
        log.warning("spool %s: its page index was damaged too, so some salvaged readings may be ones already "
                    "delivered; the store counts those as duplicates", path)
    return result


# --- reading the pages of a damaged SQLite file ourselves ---
# (https://www.sqlite.org/fileformat2.html): enough of the format to find the
# spool table's rows on every page that still parses, whatever else is broken.

_WAL_MAGIC = (0x377F0682, 0x377F0683)  # little- and big-endian checksums
_LEAF, _INTERIOR = 0x0D, 0x05  # table b-tree page types


@dataclass
class _Found:
    rows: list[tuple[int, float, bytes, int | None]] = field(default_factory=list)
    seq: int | None = None  # sqlite_sequence's last id for the spool table
    max_id: int | None = None
    min_key: int | None = None  # the lowest rowid known to have existed (rows and interior keys)
    max_key: int | None = None
    unreadable_pages: int = 0
    may_repeat: bool = False
    bounded: bool = True  # False when even the range of ids the file held is unknown

    def lost_estimate(self, salvaged: int) -> int:
        hi = max(x for x in (self.max_key, self.seq, self.max_id, 0) if x is not None)
        lo = self.min_key
        if lo is None or hi < lo:
            return 0
        return max(0, hi - lo + 1 - salvaged)


class _Pages:
    """The pages of a database file as the last commit left them: the main file, overlaid by
    the write-ahead log's committed frames whose checksums hold."""

    def __init__(self, path: Path):
        self._main = b""
        self._map: mmap.mmap | None = None
        size = path.stat().st_size if path.exists() else 0
        if size:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.header_ok = False
        self.page_size = 0
        self.reserved = 0
        self.n_pages = 0
        self.freelist_trunk = 0
        main = self._map if self._map is not None else b""
        if len(main) >= 100 and main[:16] == b"SQLite format 3\x00":
            ps = int.from_bytes(main[16:18], "big")
            ps = 65536 if ps == 1 else ps
            if 512 <= ps <= 65536 and ps & (ps - 1) == 0:
                self.header_ok = True
                self.page_size = ps
                self.reserved = main[20]
                counter, pages, valid_for = (int.from_bytes(main[k:k + 4], "big") for k in (24, 28, 92))
                self.n_pages = pages if pages and counter == valid_for else 0
                self.freelist_trunk = int.from_bytes(main[32:36], "big")
        self._wal: dict[int, bytes] = {}
        wal_pages = self._read_wal(Path(f"{path}-wal"))
        if not self.page_size:
            self.page_size = self._guess_page_size(main)
        if wal_pages:
            self.n_pages = wal_pages
        if not self.n_pages:
            self.n_pages = max(-(-len(main) // self.page_size) if self.page_size else 0, max(self._wal, default=0))
        self.main = main

    def _read_wal(self, wal: Path) -> int:
        """Load the committed frames of the WAL; the database size in pages after the last commit (0: none)."""
        if not wal.exists() or wal.stat().st_size < 32:
            return 0
        data = wal.read_bytes()
        magic, _version, ps = struct.unpack(">III", data[:12])
        if magic not in _WAL_MAGIC or not (512 <= ps <= 65536 and ps & (ps - 1) == 0):
            return 0
        if self.page_size and ps != self.page_size:
            return 0
        order = "<" if magic == _WAL_MAGIC[0] else ">"
        s0, s1 = _wal_checksum(data[:24], 0, 0, order)
        if (s0, s1) != struct.unpack(">II", data[24:32]):
            return 0
        salt = data[16:24]
        self.page_size = ps
        pending: dict[int, bytes] = {}
        size = 0
        off = 32
        while off + 24 + ps <= len(data):
            head = data[off:off + 24]
            page = data[off + 24:off + 24 + ps]
            pgno, commit = struct.unpack(">II", head[:8])
            if head[8:16] != salt:
                break
            s0, s1 = _wal_checksum(head[:8], s0, s1, order)
            s0, s1 = _wal_checksum(page, s0, s1, order)
            if (s0, s1) != struct.unpack(">II", head[16:24]):
                break
            pending[pgno] = page
            if commit:
                self._wal.update(pending)
                pending = {}
                size = commit
            off += 24 + ps
        return size

    @staticmethod
    def _guess_page_size(main: bytes | mmap.mmap) -> int:
        """With no readable header: the size at which the most pages look like b-tree pages."""
        best, best_score = 4096, 0.0
        for ps in (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512):
            pages = min(len(main) // ps, 256)
            score = sum(1 for k in range(1, pages) if main[k * ps] in (0x02, 0x05, 0x0A, 0x0D)
                        and int.from_bytes(main[k * ps + 3:k * ps + 5], "big") * 2 < ps)
            if pages > 1 and score / (pages - 1) > best_score:
                best, best_score = ps, score / (pages - 1)
        return best

    @property
    def usable(self) -> int:
        return self.page_size - self.reserved

    def get(self, pgno: int) -> bytes | None:
        if pgno < 1 or pgno > self.n_pages:
            return None
        page = self._wal.get(pgno)
        if page is not None:
            return page
        start = (pgno - 1) * self.page_size
        if start + self.page_size > len(self.main):
            return None  # truncated away
        return bytes(self.main[start:start + self.page_size])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()


def _wal_checksum(data: bytes, s0: int, s1: int, order: str) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for k in range(0, len(words), 2):
        s0 = (s0 + words[k] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[k + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = 0
    for k in range(8):
        b = buf[i + k]
        v = (v << 7) | (b & 0x7F)
        if b < 0x80:
            return v, i + k + 1
    return (v << 8) | buf[i + 8], i + 9


def _cells(pages: _Pages, page: bytes, pgno: int) -> Iterator[tuple[int, bytes]]:
    """(rowid, record payload) of every cell of a table leaf page that parses; raises on a broken page."""
    hdr = 100 if pgno == 1 else 0
    usable = pages.usable
    n = int.from_bytes(page[hdr + 3:hdr + 5], "big")
    if hdr + 8 + 2 * n > usable:
        raise ValueError("cell count beyond the page")
    max_local = usable - 35
    min_local = (usable - 12) * 32 // 255 - 23
    for k in range(n):
        try:
            at = int.from_bytes(page[hdr + 8 + 2 * k:hdr + 10 + 2 * k], "big")
            if not hdr + 8 + 2 * n <= at < usable:
                continue
            size, at = _varint(page, at)
            rowid, at = _varint(page, at)
            if size <= max_local:
                payload = page[at:at + size]
                if len(payload) != size or at + size > usable:
                    continue
            else:
                local = min_local + (size - min_local) % (usable - 4)
                local = local if local <= max_local else min_local
                payload = page[at:at + local]
                nxt = int.from_bytes(page[at + local:at + local + 4], "big")
                parts = [payload]
                have, seen = len(payload), set()
                while have < size and nxt and nxt not in seen:
                    seen.add(nxt)
                    ov = pages.get(nxt)
                    if ov is None:
                        break
                    part = ov[4:usable][: size - have]
                    parts.append(part)
                    have += len(part)
                    nxt = int.from_bytes(ov[:4], "big")
                if have < size:
                    continue  # its overflow chain is broken: the row is lost
                payload = b"".join(parts)
            yield rowid, payload
        except IndexError:
            continue


def _record(payload: bytes) -> list[object] | None:
    """The column values of a record, or None when it does not parse."""
    try:
        hsize, i = _varint(payload, 0)
        types = []
        while i < hsize:
            t, i = _varint(payload, i)
            types.append(t)
        if i != hsize or hsize > len(payload):
            return None
        values: list[object] = []
        at = hsize
        for t in types:
            if t == 0:
                values.append(None)
            elif 1 <= t <= 6:
                width = (1, 2, 3, 4, 6, 8)[t - 1]
                values.append(int.from_bytes(payload[at:at + width], "big", signed=True))
                at += width
            elif t == 7:
                values.append(struct.unpack(">d", payload[at:at + 8])[0])
                at += 8
            elif t in (8, 9):
                values.append(t - 8)
            elif t >= 12:
                width = (t - 12) // 2 if t % 2 == 0 else (t - 13) // 2
                values.append(payload[at:at + width])
                at += width
            else:
                return None
        return values if at <= len(payload) else None
    except (IndexError, struct.error):
        return None


def _spool_row(rowid: int, values: list[object]) -> tuple[int, float, bytes, int | None] | None:
    """A spool row (id, enqueued_at, item bytes, crc) from a record, or None when it is not one."""
    if len(values) not in (3, 4) or values[0] is not None or rowid <= 0:
        return None
    at, item = values[1], values[2]
    crc = values[3] if len(values) == 4 else None
    if isinstance(at, int) and not isinstance(at, bool):
        at = float(at)
    if not isinstance(at, float) or not 0 < at < 1e11 or not isinstance(item, bytes) or not item:
        return None
    if crc is not None and not isinstance(crc, int):
        return None
    return rowid, at, item, crc


def _schema_roots(pages: _Pages) -> dict[str, int]:
    """Root pages by table name from page 1, when it parses."""
    page = pages.get(1)
    roots: dict[str, int] = {}
    if page is None or page[100] != _LEAF:
        return roots
    try:
        for _rowid, payload in _cells(pages, page, 1):
            v = _record(payload)
            if v and len(v) == 5 and v[0] == b"table" and isinstance(v[1], bytes) and isinstance(v[3], int):
                roots[v[1].decode(errors="replace")] = v[3]
    except ValueError:
        pass
    return roots


def salvage_rows(path: Path) -> _Found:
    """Every spool row still readable in a damaged SQLite file (and its -wal), in no particular order.

    Rows come from the spool table's b-tree where it can be walked; where it
    cannot (a broken interior page, a garbage header), from every page that
    parses as a table leaf holding spool rows. Such orphan pages may include
    freed pages that still hold delivered rows, so `may_repeat` says so
    (SQLite builds with secure_delete, like Debian's, zero freed pages).
    """
    pages = _Pages(path)
    found = _Found()
    try:
        if not pages.page_size or pages.n_pages == 0:
            found.bounded = False
            return found
        roots = _schema_roots(pages)
        root = roots.get("spool", 2)
        seq_root = roots.get("sqlite_sequence", 3)
        reachable: set[int] = set()
        tree_damaged = False
        stack, seen = [root], set()
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            page = pages.get(p)
            kind = page[100 if p == 1 else 0] if page is not None else None
            if kind == _LEAF:
                reachable.add(p)
            elif kind == _INTERIOR and page is not None:
                try:
                    n = int.from_bytes(page[3:5], "big")
                    stack.append(int.from_bytes(page[8:12], "big"))
                    for k in range(n):
                        at = int.from_bytes(page[12 + 2 * k:14 + 2 * k], "big")
                        stack.append(int.from_bytes(page[at:at + 4], "big"))
                        key, _ = _varint(page, at + 4)
                        found.min_key = key if found.min_key is None else min(found.min_key, key)
                        found.max_key = key if found.max_key is None else max(found.max_key, key)
                except IndexError:
                    tree_damaged = True
            else:
                tree_damaged = True
                found.unreadable_pages += 1
        free = _freelist(pages) if pages.header_ok else None
        orphans = tree_damaged  # leaf pages the walk could not reach may hold live rows
        found.may_repeat = orphans and free is None
        if not pages.header_ok and not reachable and not tree_damaged:
            found.bounded = False
        for p in range(1, pages.n_pages + 1):
            if p == seq_root:
                found.seq = _sequence(pages, p) or found.seq
            if free is not None and p in free:
                continue
            if p not in reachable and not orphans:
                continue
            page = pages.get(p)
            if page is None:
                if p not in seen:  # missing (truncated away) where the walk could not look
                    found.unreadable_pages += 1
                continue
            if page[100 if p == 1 else 0] != _LEAF:
                continue
            try:
                for rowid, payload in _cells(pages, page, p):
                    values = _record(payload)
                    row = _spool_row(rowid, values) if values is not None else None
                    if row is None:
                        if values and len(values) == 2 and values[0] == b"spool" and isinstance(values[1], int):
                            found.seq = max(found.seq or 0, values[1])
                        continue
                    found.rows.append(row)
                    found.max_id = rowid if found.max_id is None else max(found.max_id, rowid)
                    found.min_key = rowid if found.min_key is None else min(found.min_key, rowid)
            except ValueError:
                if p in reachable:
                    found.unreadable_pages += 1
        if found.min_key is None and found.seq is None:
            found.bounded = False  # nothing says how many rows the file held
        found.may_repeat = found.may_repeat and bool(found.rows)
        return found
    finally:
        pages.close()


def _sequence(pages: _Pages, pgno: int) -> int | None:
    page = pages.get(pgno)
    if page is None or page[0] != _LEAF:
        return None
    try:
        for _rowid, payload in _cells(pages, page, pgno):
            v = _record(payload)
            if v and len(v) == 2 and v[0] == b"spool" and isinstance(v[1], int):
                return v[1]
    except ValueError:
        return None
    return None


def _freelist(pages: _Pages) -> set[int] | None:
    """Every page on the free list, or None when the list cannot be followed to its end."""
    free: set[int] = set()
    trunk = pages.freelist_trunk
    while trunk:
        if trunk in free:
            return None
        page = pages.get(trunk)
        if page is None:
            return None
        free.add(trunk)
        n = int.from_bytes(page[4:8], "big")
        if n > (pages.usable - 8) // 4:
            return None
        free.update(int.from_bytes(page[8 + 4 * k:12 + 4 * k], "big") for k in range(n))
        trunk = int.from_bytes(page[:4], "big")
    return free
