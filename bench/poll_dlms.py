"""DLMS/COSEM (SPODES) over HDLC: reads per second on one RS-485 line beside the line bound.

16 simulated SPODES meters share one paced pseudo-terminal at 9600 baud
(8N1, 10 bits a character), each at its own physical address. One read is a
whole exchange as the gateway does it every slot: SNRM/UA, AARQ/AARE with
the reader's password, the tariff registers' values (their scaler_unit is
read once per meter and kept, as the adapter does), the clock, DISC/UA.

The line bound is the time the bytes of every frame, both ways, need on the
wire: sum(bytes) * 10 / 9600 s. HDLC frames are delimited by their flags and
need no silence between them, so the inter-frame gap in the bound is zero;
the simulated meters answer with no reaction time, so the figure measures
the line and our code.

The back-fill run reads a day of the 30-minute load profile (48 slots) from
each meter (one association, capture objects and period cached, the buffer
by range in GET data blocks over segmented HDLC frames), beside the same
kind of bound.

    .venv/bin/python bench/poll_dlms.py            # 160 reads (10 rounds of 16 meters), 16 day back-fills
    .venv/bin/python bench/poll_dlms.py --quick    # 32 reads, 4 back-fills
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _line import line_bench_main

from adapters.dlms import DlmsAdapter
from amr.settings import Settings
from collector.inventory import Meter
from simulators.dlms_sim import HdlcMeterLine, SimMeter

BAUD = 9600
BITS = 10
NOW = datetime(2026, 3, 2, 0, 5, tzinfo=UTC)
REGISTERS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3")


def _now() -> datetime:
    return NOW


def run(meters: int, rounds: int, backfills: int) -> list[dict[str, float | int | str]]:
    sims = [SimMeter(17 + i, "12345678", seed=i + 1, now=_now) for i in range(meters)]
    adapter = DlmsAdapter(Settings(), clock_tolerance_s=60, now=_now)
    out: list[dict[str, float | int | str]] = []
    with HdlcMeterLine(sims, BAUD) as line:
        inv = [Meter(id=f"m{s.physical_address}", account="1", adapter="dlms", port=line.device, baudrate=BAUD,
                     physical_address=s.physical_address, password="12345678", registers=REGISTERS, timeout=1.0)
               for s in sims]
        for m in inv:  # open the port, cache each meter's scalers and warm the models, untimed
            adapter.read_blocking(m)
        line_s = 0.0
        n = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            for m in inv:
                adapter.read_blocking(m)
                w = adapter.last_wire
                line_s += (w.sent + w.received) * BITS / BAUD
                n += 1
        elapsed = time.perf_counter() - t0
        out.append({
            "run": "read", "baud": BAUD, "meters_on_line": meters, "reads": n, "seconds": round(elapsed, 3),
            "reads_per_s": round(n / elapsed, 3), "line_bound_reads_per_s": round(n / line_s, 3),
            "ratio": round(line_s / elapsed, 4),
        })
        day = NOW.replace(hour=0, minute=0) - timedelta(days=1)
        for m in inv[:backfills]:  # capture objects and period, cached like the scalers
            adapter.read_profile_blocking(m, day, day + timedelta(hours=1), 1)
        line_s = 0.0
        slots = 0
        t0 = time.perf_counter()
        for m in inv[:backfills]:
            got = adapter.read_profile_blocking(m, day, day + timedelta(days=1), 48)
            slots += len(got)
            w = adapter.last_wire
            line_s += (w.sent + w.received) * BITS / BAUD
        elapsed = time.perf_counter() - t0
        out.append({
            "run": "backfill_day", "baud": BAUD, "meters": backfills, "slots": slots, "seconds": round(elapsed, 3),
            "line_bound_seconds": round(line_s, 3), "ratio": round(line_s / elapsed, 4),
        })
    adapter.close_blocking()
    return out


def main(argv: list[str] | None = None) -> int:
    return line_bench_main("DLMS/HDLC", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
