"""The gateway spool: durable, ordered, bounded with an explicit policy."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from adapters.reading import Reading, Rejected
from collector.gateway.spool import Spool, SpoolError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _readings(n: int, start: int = 0) -> list[Reading]:
    return [
        Reading("m-1", "1.8.0", T0 + timedelta(minutes=30 * i), Decimal(i) / 4, frozenset({"retried"}), "modbus")
        for i in range(start, start + n)
    ]


def test_put_peek_ack_in_order_and_reopen(tmp_path):
    path = tmp_path / "spool.sqlite"
    s = Spool(path, 100)
    s.put(_readings(5))
    rej = Rejected("modbus:bus1", b"\x01\x03\xff", "meter 'm-9': CRC mismatch", "crc", "m-9", "1.8.0", T0)
    s.put([rej])
    s.put(_readings(3, 5))
    entries = s.peek(4)
    assert [e.item.value for e in entries] == [Decimal(i) / 4 for i in range(4)]
    # every field survives, quality and source too, and the reading says it went through the spool
    assert entries[0].item == _readings(1)[0].flagged("spooled")
    assert s.ack(e.id for e in entries[:2]) == 2
    assert s.ack([entries[0].id, 10_000]) == 0  # already gone / never there: ignored
    s.close()
    s = Spool(path, 100)
    assert len(s) == 7
    items = [e.item for e in s.peek(100)]
    assert items[3] == rej
    assert [i.value for i in items if isinstance(i, Reading)] == [Decimal(i) / 4 for i in (2, 3, 4, 5, 6, 7)]
    assert REGISTRY.get_sample_value("amr_spool_depth") == 7


def test_ack_any_ids_in_any_order(tmp_path):
    s = Spool(tmp_path / "s.sqlite", 100)
    s.put(_readings(6))
    ids = [e.id for e in s.peek(6)]
    assert s.ack([ids[4], ids[1]]) == 2  # not a run: removed one by one
    assert s.ack(ids[:3]) == 2  # a run with a hole already acknowledged
    assert [e.item.value * 4 for e in s.peek(10)] == [3, 5] and len(s) == 2


def test_drop_oldest_keeps_newest_with_metric_and_log(tmp_path, caplog):
    before = REGISTRY.get_sample_value("amr_spool_dropped_total", {"policy": "drop_oldest"}) or 0
    s = Spool(tmp_path / "s.sqlite", 10, "drop_oldest")
    s.put(_readings(8))
    with caplog.at_level(logging.WARNING, logger="collector.gateway.spool"):
        s.put(_readings(5, 8))
    assert [e.item.value * 4 for e in s.peek(100)] == list(range(3, 13))
    assert REGISTRY.get_sample_value("amr_spool_dropped_total", {"policy": "drop_oldest"}) - before == 3
    assert any("3 oldest readings dropped by policy drop_oldest" in r.getMessage() for r in caplog.records)
    s.put(_readings(25, 100))  # one batch larger than the whole spool: its newest 10 stay
    assert [e.item.value * 4 for e in s.peek(100)] == list(range(115, 125))


def test_refuse_new_keeps_oldest_with_metric_and_log(tmp_path, caplog):
    before = REGISTRY.get_sample_value("amr_spool_dropped_total", {"policy": "refuse_new"}) or 0
    s = Spool(tmp_path / "s.sqlite", 10, "refuse_new")
    assert s.put(_readings(8)) == 8
    with caplog.at_level(logging.WARNING, logger="collector.gateway.spool"):
        assert s.put(_readings(5, 8)) == 2
        assert s.put(_readings(1, 20)) == 0
    assert [e.item.value * 4 for e in s.peek(100)] == list(range(10))
    assert REGISTRY.get_sample_value("amr_spool_dropped_total", {"policy": "refuse_new"}) - before == 4
    assert any("new readings refused by policy refuse_new" in r.getMessage() for r in caplog.records)


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(SpoolError, match="policy 'drop_newest' unknown"):
        Spool(tmp_path / "s.sqlite", 10, "drop_newest")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    s = Spool(tmp_path / "junk.sqlite", 10)  # damaged, not a configuration error: moved aside, and a fresh spool
    assert s.salvage is not None and s.salvage.salvaged == 0 and len(s) == 0
    assert s.salvage.moved_to.read_bytes() == b"this is not a database" * 100


def test_kill_9_loses_nothing_that_put_returned(tmp_path):
    """A writer killed mid-stream: every batch whose put() returned is there, in order."""
    path = tmp_path / "s.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from datetime import UTC, datetime, timedelta
        from decimal import Decimal
        from adapters.reading import Reading
        from collector.gateway.spool import Spool
        s = Spool({str(path)!r}, 1_000_000)
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        i = 0
        while True:
            s.put([Reading("m", "1.8.0", t0 + timedelta(minutes=k), Decimal(k)) for k in range(i, i + 50)])
            i += 50
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    confirmed = 0
    try:
        for line in proc.stdout:
            confirmed = int(line)
            if confirmed >= 3000:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert confirmed >= 3000
    s = Spool(path, 1_000_000)
    values = [int(e.item.value) for e in s.peek(1_000_000)]
    assert len(values) >= confirmed
    assert values == list(range(len(values)))  # in order, no gaps, no torn batch
    assert len(values) % 50 == 0


# --- damage: the spool survives it, salvages what is readable and says what it lost ---


def _filled(path, n: int = 20_000, batch: int = 500) -> list[Reading]:
    """A spool as a gateway leaves it: n readings put in batches, closed (checkpointed into the file)."""
    sent = _readings(n)
    with Spool(path, 1_000_000) as s:
        for i in range(0, n, batch):
            s.put(sent[i:i + batch])
    return sent


def _drain(s: Spool) -> list:
    items = []
    while entries := s.peek(500):
        items += [e.item for e in entries]
        s.ack(e.id for e in entries)
    return items


def _truncate(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage_in_the_middle(path) -> None:
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * 0.4))
        f.write(random.Random(7).randbytes(64 * 1024))


def _garbage_header(path) -> None:
    with open(path, "r+b") as f:
        f.write(random.Random(8).randbytes(4096))  # the header and the whole first page (the schema)


def _zero_length(path) -> None:
    os.truncate(path, 0)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0


@pytest.mark.parametrize("damage", [_truncate, _garbage_in_the_middle, _garbage_header, _zero_length],
                         ids=["truncated", "garbage_in_the_middle", "garbage_header", "zero_length"])
def test_a_damaged_spool_is_salvaged_moved_aside_and_said(tmp_path, caplog, damage):
    path = tmp_path / "spool.sqlite"
    sent = _filled(path)
    damage(path)
    damaged_bytes = path.read_bytes()
    before = {k: _sample("amr_spool_salvaged_total", outcome=k) for k in ("salvaged", "lost")}
    damaged_before = _sample("amr_spool_damaged_total")
    with caplog.at_level(logging.WARNING, logger="collector.gateway.spool"):
        s = Spool(path, 1_000_000)  # as the gateway opens it: no exception, a usable spool
    sv = s.salvage
    assert sv is not None and sv.moved_to is not None
    assert sv.moved_to.name.startswith("spool.sqlite.corrupt-") and sv.moved_to.read_bytes() == damaged_bytes
    got = _drain(s)
    readings = [r for r in got if isinstance(r, Reading)]
    # nothing invented, nothing reordered, nothing twice: every salvaged reading is one that was put
    index = {r.ts: k for k, r in enumerate(sent)}
    assert all(r == sent[index[r.ts]].flagged("spooled") for r in readings)
    assert [index[r.ts] for r in readings] == sorted({index[r.ts] for r in readings})
    assert len(got) == sv.salvaged
    if damage is _zero_length:
        assert sv.salvaged == 0
    else:
        assert sv.salvaged > 0 and sv.salvaged + sv.lost == len(sent)
    if damage is _garbage_header:
        assert sv.salvaged == len(sent)  # every page of rows is intact: none is lost
    if damage is _truncate:
        assert 0.4 * len(sent) < sv.salvaged < 0.6 * len(sent)
    assert _sample("amr_spool_damaged_total") == damaged_before + 1
    assert _sample("amr_spool_salvaged_total", outcome="salvaged") - before["salvaged"] == sv.salvaged
    assert _sample("amr_spool_salvaged_total", outcome="lost") - before["lost"] == sv.lost
    line = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(line) == 1 and f"salvaged {sv.salvaged} readings" in line[0] and f"lost {sv.lost}" in line[0]
    assert str(sv.moved_to) in line[0]
    # and it is a spool again: new readings go in and come out after the salvaged ones
    s.put(_readings(3, 50_000))
    assert [e.item.value for e in s.peek(10)] == [r.value for r in _readings(3, 50_000)]
    s.close()
    assert Spool(path, 100).salvage is None  # sound now


def test_damage_with_the_write_ahead_log_still_beside_it(tmp_path):
    """A power cut leaves the newest rows in spool.sqlite-wal: the salvage reads them there too."""
    import shutil

    src, path = tmp_path / "live.sqlite", tmp_path / "spool.sqlite"
    sent = _filled(src, 10_000)
    live = Spool(src, 1_000_000)
    live.ack(e.id for e in live.peek(2_000))  # delivered before the cut: must not come back
    more = _readings(3_000, 10_000)
    for i in range(0, len(more), 500):
        live.put(more[i:i + 500])
    for suffix in ("", "-wal"):  # the files as the cut left them, the connection still open
        shutil.copy(f"{src}{suffix}", f"{path}{suffix}")
    live.close()
    assert os.path.getsize(f"{path}-wal") > 0
    _truncate(path)
    s = Spool(path, 1_000_000)
    assert s.salvage is not None and Path(f"{s.salvage.moved_to}-wal").exists()
    got = [r.value for r in _drain(s) if isinstance(r, Reading)]
    expected = [r.value for r in sent[2_000:] + more]
    assert set(got) <= set(expected) and len(got) == len(set(got)) == s.salvage.salvaged
    assert set(r.value for r in more) <= set(got)  # the newest rows, in the log, all salvaged
    assert s.salvage.salvaged + s.salvage.lost == len(expected)


def test_one_bad_row_costs_that_row_not_its_batch(tmp_path, caplog):
    path = tmp_path / "spool.sqlite"
    sent = _filled(path, 2_000)
    data = bytearray(path.read_bytes())
    victim = sent[777]
    at = data.index(f'"value":"{victim.value}"'.encode())
    data[at + 9:at + 12] = b"\xff#!"  # bytes changed on disk inside one row: not even UTF-8 now
    path.write_bytes(bytes(data))
    undecodable = _sample("amr_spool_salvaged_total", outcome="undecodable")
    s = Spool(path, 1_000_000)
    assert s.salvage is None  # the file is sound; the row is not
    with caplog.at_level(logging.WARNING, logger="collector.gateway.spool"):
        texts = s.peek_encoded(1000)  # the uplink's fast path: the batch that holds the row
    assert len(texts) == 1000 and any("could not be read back" in r.getMessage() for r in caplog.records)
    items = [e.item for e in s.peek(1000)]
    rejected = [(k, it) for k, it in enumerate(items) if isinstance(it, Rejected)]
    assert [k for k, _ in rejected] == [777]  # in its place, alone
    rej = rejected[0][1]
    assert rej.code == "malformed" and "CRC" in rej.reason and b"\xff#!" in rej.raw
    assert [it for it in items if isinstance(it, Reading)] == [r.flagged("spooled") for r in sent[:1000] if r != victim]
    assert _sample("amr_spool_salvaged_total", outcome="undecodable") == undecodable + 1
    assert len(_drain(s)) == 2_000  # every other row goes on as it was


def test_a_row_without_crc_that_does_not_decode_becomes_a_reject(tmp_path):
    """A spool of an earlier version has rows without a CRC: the decode is their check."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, enqueued_at REAL NOT NULL, item TEXT NOT NULL)")
    from adapters.wire import encode_item

    rows = [encode_item(r, "spooled") for r in _readings(3)]
    rows[1] = rows[1][:-5]  # cut short
    db.executemany("INSERT INTO spool (enqueued_at, item) VALUES (1, ?)", [(t,) for t in rows])
    db.commit()
    db.close()
    s = Spool(path, 100)
    items = [e.item for e in s.peek(10)]
    assert [type(i).__name__ for i in items] == ["Reading", "Rejected", "Reading"]
    assert items[1].raw == rows[1].encode() and "does not decode" in items[1].reason
    s.put(_readings(1, 5))  # the upgraded table takes rows with a CRC
    assert len(s.peek_encoded(10)) == 4


def test_amr_gateway_starts_on_a_truncated_spool_salvages_and_polls(db_url, tmp_path):
    """The daemon as an operator starts it, on a spool a power cut truncated: it says what it
    salvaged and lost, delivers the salvaged readings and polls on (it used to exit 2 and poll nothing)."""
    import psycopg

    from collector.inventory import load_inventory, parse_inventory, upsert_inventory
    from simulators.modbus_sim import inventory_toml
    from tests.conftest import ROOT, free_port
    from tests.test_scheduler import live_fleet

    spool = tmp_path / "spool.sqlite"
    old = [Reading("hist-1", "1.8.0", datetime.now(UTC).replace(microsecond=0) - timedelta(days=100) + timedelta(minutes=30 * i),
                   Decimal(i) / 4, frozenset(), "modbus") for i in range(4_000)]
    with Spool(spool, 1_000_000) as s:
        for i in range(0, len(old), 500):
            s.put(old[i:i + 500])
    _truncate(spool)
    port = free_port()
    with live_fleet([(port, 1)]) as fleet:
        inv = tmp_path / "inventory.toml"
        inv.write_text(inventory_toml(fleet.meters, "generic_counter", interval="1s", timeout=0.5))
        with psycopg.connect(db_url) as conn:
            upsert_inventory(conn, load_inventory(inv))
            upsert_inventory(conn, parse_inventory({"subscriber": [{"account": "7"}],
                                                    "meter": [{"id": "hist-1", "account": "7"}]}))
        env = {**os.environ, "AMR_DATABASE_URL": db_url, "AMR_SPOOL_PATH": str(spool), "AMR_METRICS_PORT": "0",
               "AMR_MQTT_URL": "", "AMR_LOG_FORMAT": "text"}
        done = subprocess.run([sys.executable, "-m", "amr.cli", "gateway", "--inventory", str(inv),
                               "--cycles", "2", "--jitter", "0"],
                              env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "is damaged" in line]
    assert len(said) == 1, done.stderr
    import re

    m = re.search(r"salvaged (\d+) readings into a fresh spool, lost (\d+)", said[0])
    assert m, said[0]
    salvaged, lost = int(m.group(1)), int(m.group(2))
    assert salvaged > 1000 and salvaged + lost == len(old)
    assert list(tmp_path.glob("spool.sqlite.corrupt-*"))
    with psycopg.connect(db_url) as conn:
        hist = conn.execute("SELECT count(*) FROM reading WHERE meter_id = 'hist-1'").fetchone()[0]
        polled = conn.execute("SELECT count(*) FROM reading WHERE meter_id = %s", (f"sim-{port}-1",)).fetchone()[0]
        rejects = conn.execute("SELECT count(*) FROM rejected_reading").fetchone()[0]
    assert hist == salvaged and rejects == 0, done.stderr[-3000:]  # every salvaged reading delivered
    assert polled == 2  # and it polled: two slots
