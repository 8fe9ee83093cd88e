"""The gateway spool: durable, ordered, bounded with an explicit policy."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from prometheus_client import REGISTRY

from adapters.reading import Reading, Rejected
from collector.spool import Spool, SpoolError

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
    with caplog.at_level(logging.WARNING, logger="collector.spool"):
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
    with caplog.at_level(logging.WARNING, logger="collector.spool"):
        assert s.put(_readings(5, 8)) == 2
        assert s.put(_readings(1, 20)) == 0
    assert [e.item.value * 4 for e in s.peek(100)] == list(range(10))
    assert REGISTRY.get_sample_value("amr_spool_dropped_total", {"policy": "refuse_new"}) - before == 4
    assert any("new readings refused by policy refuse_new" in r.getMessage() for r in caplog.records)


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(SpoolError, match="policy 'drop_newest' unknown"):
        Spool(tmp_path / "s.sqlite", 10, "drop_newest")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError, match="cannot open"):
        Spool(tmp_path / "junk.sqlite", 10)


def test_kill_9_loses_nothing_that_put_returned(tmp_path):
    """A writer killed mid-stream: every batch whose put() returned is there, in order."""
    path = tmp_path / "s.sqlite"
    code = textwrap.dedent(f"""
        import sys
        from datetime import UTC, datetime, timedelta
        from decimal import Decimal
        from adapters.reading import Reading
        from collector.spool import Spool
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
