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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection, wait
from typing import Any

from adapters.reading import Reading, Rejected
from amr.errors import UserError
from collector.ingest.importfile import CsvDialect, LineParser
from collector.ingest.ingestor import Ingestor, IngestResult, RefusedInput
from collector.ingest.layout import split_source

log = logging.getLogger("amr.ingest")

Line = tuple[int, bytes, bool]  # (line number, bytes, too long)
_IN_FLIGHT = 2  # chunks a worker holds at most: one being stored, one waiting
# A window (what is grouped by meter before it is stored) is this many batches of lines:
# a time-sorted file's window then holds WINDOW_BATCHES times as many readings of each
# meter as one batch would, and memory stays bounded by the window, not the file.
WINDOW_BATCHES = 4


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

    def key(self, raw: bytes) -> bytes:
        """The bytes of a line's meter, as split here (b"" when they cannot be told this way)."""
        if self.fmt == "csv":
            if b'"' in raw:
                return b""  # quoted fields: rare in exports, parsed properly by worker 0
            cells = raw.split(self.delimiter, self.column + 1)
            if len(cells) <= self.column:
                return b""
            return cells[self.column].strip()
        at = raw.find(b'"meter_id"')  # `"meter_id": "M1"`: the text between the next two quotes
        parts = raw[at + 10: at + 80].split(b'"', 2) if at >= 0 else []
        return parts[1] if len(parts) == 3 else b""

    def worker(self, raw: bytes) -> int:
        return zlib.crc32(self.key(raw)) % self.workers  # b"" (crc 0) goes to worker 0


def grouped(lines: list[Line], key: Callable[[bytes], bytes], batch: int) -> Iterator[list[Line]]:
    """A window of lines as ingest calls of at most `batch` lines, each holding whole meters' runs.

    A file sorted by time holds one reading of each meter in a row; the
    ingestor stores a register's readings of one call together (one window
    probe, one COPY run, each day's totals once), so a call with many readings
    of fewer meters stores far faster than one with a reading of every meter.
    The meters go in the order they first appear; inside a call the lines keep
    the file's order (so refusals are recorded in it). A window no longer than
    `batch` is one call, exactly as read.
    """
    if len(lines) <= batch:
        if lines:
            yield lines
        return
    groups: dict[bytes, list[Line]] = {}
    for line in lines:
        k = b"" if line[2] else key(line[1])
        run = groups.get(k)
        if run is None:
            groups[k] = [line]
        else:
            run.append(line)
    call: list[Line] = []
    for run in groups.values():
        if call and len(call) + len(run) > batch:
            call.sort(key=_number)
            yield call
            call = []
        if len(run) > batch:  # one meter beyond a call: its own calls, in file order
            for i in range(0, len(run) - batch, batch):
                yield run[i:i + batch]
            run = run[(len(run) - 1) // batch * batch:]
        call.extend(run)
    if call:
        call.sort(key=_number)
        yield call


def _number(line: Line) -> int:
    return line[0]


def store_window(ingestor: Ingestor, parser: LineParser, lines: list[Line], batch: int,
                 key: Callable[[bytes], bytes]) -> IngestResult:
    """Parse and store a window of lines in calls grouped by meter (`grouped`); one result for all.

    The result's refused inputs are those of every call, in the file's order.
    """
    return _combined([ingestor.ingest(parser.parse_many(call)) for call in grouped(lines, key, batch)])


def _combined(results: list[IngestResult]) -> IngestResult:
    """The results of a window's calls as one, its refused inputs in the file's order."""
    total = IngestResult()
    refused: list[RefusedInput] = []
    for result in results:
        total += result
        refused += result.refused
    if len(results) > 1:
        refused.sort(key=_line_number)
    total.refused = refused
    return total


def _line_number(r: RefusedInput) -> int:
    return split_source(r.source or "")[1] or 0


def _worker(conn: Connection, database_url: str, fmt: str, source: str, dialect: CsvDialect | None,
            batch: int) -> None:
    """A worker process: parse each chunk of lines it is sent, store it grouped by meter, send back the result."""
    from amr.runtime import tune_gc
    from amr.storage import db

    tune_gc()
    parser = LineParser(fmt, source, dialect)
    key = _Router.of(1, fmt, dialect).key
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
                conn.send(("done", store_window(ingestor, parser, chunk, batch, key)))
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
    def __init__(self, workers: int, database_url: str, fmt: str, source: str, dialect: CsvDialect | None,
                 batch: int):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited connections
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.busy = [0] * workers
        self.outboxes: list[queue.Queue[list[Line] | None]] = []
        self.senders: list[threading.Thread] = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, database_url, fmt, source, dialect, batch),
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

    Each worker is sent its lines a share of a window at a time (WINDOW_BATCHES
    batches of lines over the workers) and stores them grouped by meter
    (`store_window`), at most `batch` readings a transaction. on_result gets
    each stored share's IngestResult (with its refused inputs, in file order)
    as it comes back, for counts, progress and the rejects file.
    """
    if workers < 2:
        raise ValueError("ingest_lines needs at least 2 workers; a single process reads the file itself")
    router = _Router.of(workers, fmt, dialect)
    share = max(1, batch * WINDOW_BATCHES // workers)
    pending: list[list[Line]] = [[] for _ in range(workers)]
    pool = _Pool(workers, database_url, fmt, source, dialect, batch)
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


def ingest_here(
    lines: Iterable[Line], ingestor: Ingestor, *, fmt: str, source: str, dialect: CsvDialect | None,
    batch: int, on_result: Callable[[IngestResult], None],
) -> None:
    """Store the lines of a file in this process: windows grouped by meter, parsed while the last is stored.

    A thread reads a window (WINDOW_BATCHES batches of lines), groups it by
    meter (`grouped`) and parses its calls, at most two calls ahead, while
    this thread stores them: the parsing runs while the database works on
    what was sent. on_result gets one IngestResult a window, its refused
    inputs in file order.
    """
    parser = LineParser(fmt, source, dialect)
    key = _Router.of(1, fmt, dialect).key
    window = max(1, batch * WINDOW_BATCHES)
    ahead: queue.Queue[tuple[list[Reading | Rejected], bool] | BaseException | None] = queue.Queue(2)
    stop = threading.Event()

    def put(item: tuple[list[Reading | Rejected], bool] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            it = iter(lines)
            while chunk := list(islice(it, window)):
                calls = list(grouped(chunk, key, batch))
                for i, call in enumerate(calls):
                    items = parser.parse_many(call)
                    if not put((items, i == len(calls) - 1)):
                        return
            put(None)
        except BaseException as exc:  # handed to the storing thread, which raises it
            put(exc)

    reader = threading.Thread(target=read, name="amr-ingest-read", daemon=True)
    reader.start()
    try:
        results: list[IngestResult] = []
        while (got := ahead.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            items, last = got
            results.append(ingestor.ingest(items))
            if last:
                on_result(_combined(results))
                results = []
    finally:
        stop.set()
        reader.join(5)
