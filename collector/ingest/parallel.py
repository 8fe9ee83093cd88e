"""`amr ingest` on several cores: the parent reads lines, worker processes parse and store them.

One Python process parses and stores about 30,000 readings a second, bound
by its own interpreter while the database server still has CPU to spare. So
a large file is shared out to N worker processes, each with its own database
connection and its own Ingestor, and a meter always goes to the same worker:
its readings then meet in one process (no two transactions wait on one
meter's lock, and each worker's batches hold whole runs of its meters). The
parent only reads and bounds the lines (importfile.file_lines), finds each
line's meter with a split of its bytes, and routes it; parsing, validation
and storing happen in the workers, with the same LineParser the one-process
path uses, so a line gives the same Reading or the same refusal either way.
While one worker waits for the database, the others parse: reading, parsing
and storing overlap without threads.

What a worker has committed stays committed when another fails: the parent
stops them all and says so, and running the same command again stores the
rest (what was stored counts as duplicates).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from amr.errors import UserError
from collector.ingest.importfile import CsvDialect, LineParser
from collector.ingest.ingestor import IngestResult

log = logging.getLogger("amr.ingest")

Line = tuple[int, bytes, bool]  # (line number, bytes, too long)
_IN_FLIGHT = 2  # chunks a worker holds at most: one being stored, one waiting


def default_workers(size: int | None) -> int:
    """Worker processes for a file of `size` bytes: one per core for a large file, up to 4.

    A small file (or stdin of unknown size) is not worth the second or so that
    starting the workers costs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if size is None or size < 8 * 1024 * 1024:
        return 1
    return max(1, min(cores, 4))


@dataclass
class _Router:
    """Which worker a line goes to: by the bytes of its meter column."""

    workers: int
    fmt: str
    delimiter: bytes = b","
    column: int = 0

    @classmethod
    def of(cls, workers: int, fmt: str, dialect: CsvDialect | None) -> _Router:
        if dialect is None or "meter_id" not in dialect.fields:
            return cls(workers, fmt)
        return cls(workers, fmt, dialect.delimiter.encode("ascii"), dialect.fields.index("meter_id"))

    def worker(self, raw: bytes) -> int:
        if self.fmt == "csv":
            if b'"' in raw:
                return 0  # quoted fields: rare in exports, parsed properly by worker 0
            cells = raw.split(self.delimiter, self.column + 1)
            if len(cells) <= self.column:
                return 0
            key = cells[self.column].strip()
        else:
            at = raw.find(b'"meter_id"')  # `"meter_id": "M1"`: the text between the next two quotes
            parts = raw[at + 10: at + 80].split(b'"', 2) if at >= 0 else []
            key = parts[1] if len(parts) == 3 else b""
        return zlib.crc32(key) % self.workers


def _worker(conn: Connection, database_url: str, fmt: str, source: str, dialect: CsvDialect | None) -> None:
    """A worker process: parse each chunk of lines it is sent, store it, send back the result."""
    from amr.runtime import tune_gc
    from amr.storage import db
    from collector.ingest.ingestor import Ingestor

    tune_gc()
    parser = LineParser(fmt, source, dialect)
    try:
        with db.connect(database_url) as dbconn:
            ingestor = Ingestor(dbconn)
            conn.send(("ready", None))
            while True:
                try:
                    chunk = conn.recv()
                except EOFError:
                    return
                if chunk is None:
                    return
                items = [it for n, raw, long in chunk if (it := parser.parse(n, raw, long)) is not None]
                conn.send(("done", ingestor.ingest(items)))
    except KeyboardInterrupt:
        return
    except Exception as exc:  # the parent reports it and stops the others
        try:
            conn.send(("error", _describe(exc)))
        except (BrokenPipeError, OSError):
            pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


class _Pool:
    def __init__(self, workers: int, database_url: str, fmt: str, source: str, dialect: CsvDialect | None):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited connections
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.busy = [0] * workers
        self.outboxes: list[queue.Queue[list[Line] | None]] = []
        self.senders: list[threading.Thread] = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, database_url, fmt, source, dialect),
                               name=f"amr-ingest-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            outbox: queue.Queue[list[Line] | None] = queue.Queue()
            self.outboxes.append(outbox)
            sender = threading.Thread(target=self._send_loop, args=(parent, outbox), daemon=True,
                                      name=f"amr-ingest-send-{i}")
            sender.start()
            self.senders.append(sender)
        for i in range(workers):
            self._expect(i, "ready")

    def _expect(self, i: int, kind: str) -> Any:
        try:
            got, body = self.conns[i].recv()
        except EOFError:
            raise UserError(f"ingestion worker {i} stopped unexpectedly (exit code "
                            f"{self.procs[i].exitcode}); what it had stored stays: run the command again "
                            "to store the rest") from None
        if got == "error":
            raise UserError(f"ingestion worker {i}: {body}; what was stored stays: fix it and run the same "
                            "command again (stored lines count as duplicates)")
        assert got == kind, (got, kind)
        return body

    def send(self, i: int, chunk: list[Line], on_result: Callable[[IngestResult], None]) -> None:
        while self.busy[i] >= _IN_FLIGHT:
            self._collect(on_result, only=i)
        # sent from a thread of its own: a chunk is larger than a pipe's buffer, and a worker
        # sending back a large result (many refused lines) must find this process reading
        self.outboxes[i].put(chunk)
        self.busy[i] += 1

    @staticmethod
    def _send_loop(conn: Connection, outbox: queue.Queue[list[Line] | None]) -> None:
        try:
            while (chunk := outbox.get()) is not None:
                conn.send(chunk)
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass  # the worker died: the parent hears it as EOF on the replies

    def _collect(self, on_result: Callable[[IngestResult], None], only: int | None = None) -> None:
        waiting = [self.conns[i] for i in range(len(self.conns)) if self.busy[i] and (only is None or i == only)]
        for conn in wait(waiting):
            assert isinstance(conn, Connection)
            i = self.conns.index(conn)
            result = self._expect(i, "done")
            self.busy[i] -= 1
            on_result(result)

    def drain(self, on_result: Callable[[IngestResult], None]) -> None:
        while any(self.busy):
            self._collect(on_result)

    def close(self) -> None:
        for outbox in self.outboxes:
            outbox.put(None)  # the sender sends None after what is queued: the worker ends
        for sender in self.senders:
            sender.join(10)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


def ingest_lines(
    lines: Iterable[Line], *, database_url: str, workers: int, fmt: str, source: str,
    dialect: CsvDialect | None, batch: int, on_result: Callable[[IngestResult], None],
) -> None:
    """Store the lines of a file through `workers` worker processes, routed by meter.

    on_result gets each stored chunk's IngestResult (with its refused inputs)
    as it comes back, for counts, progress and the rejects file.
    """
    if workers < 2:
        raise ValueError("ingest_lines needs at least 2 workers; a single process reads the file itself")
    router = _Router.of(workers, fmt, dialect)
    share = max(1, batch // workers)
    pending: list[list[Line]] = [[] for _ in range(workers)]
    pool = _Pool(workers, database_url, fmt, source, dialect)
    try:
        for line in lines:
            i = router.worker(line[1]) if not line[2] else 0
            chunk = pending[i]
            chunk.append(line)
            if len(chunk) >= share:
                pool.send(i, chunk, on_result)
                pending[i] = []
        for i, chunk in enumerate(pending):
            if chunk:
                pool.send(i, chunk, on_result)
        pool.drain(on_result)
    finally:
        pool.close()
