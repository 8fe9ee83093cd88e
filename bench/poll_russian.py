"""Incotex Mercury v2 (Mercury 230): reads per second on one RS-485 line beside the line bound.

16 simulated Mercury 230 meters share one paced pseudo-terminal at 9600 baud
(8N1, 10 bits a character), each at its own network address. One read is the
whole exchange the gateway does for a meter every slot: open the channel
(level 1, the password), energy since reset for every tariff of the
configured registers (1.8.0..1.8.3: four requests), the clock, close the
channel.

The line bound is what the protocol itself needs on the wire:
- the bytes of every frame, both ways: sum(bytes) * 10 / 9600 s;
- plus the silence that ends a frame. A Mercury frame has no delimiter or
  length byte: the receiver knows a frame has ended only after
  `frame_gap_chars` (6) character times of quiet (adapters/schemas/mercury.toml,
  `[line]`). Every exchange has two frames (request, answer), so the bound
  counts 2 * 6 character times of silence per exchange: the meter cannot
  start its answer before it has seen the request end, and the next request
  must wait until every meter on the line has seen the answer end.
The meters' reaction time is not counted: the simulated meters answer at once
(a real 230 takes some milliseconds), so the figure measures the line, the
pty and our code.

The back-fill run reads a day of the 30-minute average-power profile (48
records) from each meter through the adapter's profile API
(`read_profile_blocking`, adapters.base.ProfileMeter): open, the profile
pointer, one memory read per record, close (the variant word, which gives
the meter's constant, is read once per meter and kept, as the adapter does),
beside the same kind of bound.

    .venv/bin/python bench/poll_russian.py            # 160 reads (10 rounds of 16 meters), 16 day back-fills
    .venv/bin/python bench/poll_russian.py --quick    # 32 reads, 4 back-fills
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _line import line_bench_main

from adapters import mercury as mc
from adapters.mercury_adapter import MercuryAdapter
from amr.settings import Settings
from collector.inventory import Meter
from simulators.mercury_sim import MercuryBus, MercuryLineSim, MercurySimMeter

BAUD = 9600
BITS = 10
GAP_CHARS = int(mc.LINE["frame_gap_chars"])
NOW = datetime(2026, 3, 2, 0, 5, tzinfo=UTC)
REGISTERS = ("1.8.0", "1.8.1", "1.8.2", "1.8.3")


def _now() -> datetime:
    return NOW


def _wire(adapter: MercuryAdapter) -> tuple[int, int]:
    """(exchanges, bytes both ways) so far on the adapter's links."""
    stats = adapter.link_stats()
    return sum(s[1] for s in stats), sum(s[2] for s in stats)


def _line_s(exchanges: int, nbytes: int) -> float:
    """The line bound of that traffic: the bytes, and two frame gaps per exchange."""
    return (nbytes + exchanges * 2 * GAP_CHARS) * BITS / BAUD


def run(meters: int, rounds: int, backfills: int) -> list[dict[str, float | int | str]]:
    sims = [MercurySimMeter(1 + i, seed=i + 1) for i in range(meters)]
    adapter = MercuryAdapter(Settings(), now=_now, clock_tolerance_s=60)
    out: list[dict[str, float | int | str]] = []
    with MercuryLineSim(MercuryBus(sims, now=_now), BAUD) as line:
        inv = [Meter(id=f"mc{s.address}", account="1", adapter="mercury230", port=line.device, baudrate=BAUD,
                     address=str(s.address), registers=REGISTERS, timeout=1.0)
               for s in sims]
        for m in inv:  # open the port and warm the models, untimed
            adapter.read_blocking(m)
        ex0, b0 = _wire(adapter)
        n = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            for m in inv:
                adapter.read_blocking(m)
                n += 1
        elapsed = time.perf_counter() - t0
        ex1, b1 = _wire(adapter)
        line_s = _line_s(ex1 - ex0, b1 - b0)
        out.append({
            "run": "read", "baud": BAUD, "meters_on_line": meters, "reads": n, "exchanges": ex1 - ex0,
            "bytes": b1 - b0, "seconds": round(elapsed, 3), "reads_per_s": round(n / elapsed, 3),
            "line_bound_reads_per_s": round(n / line_s, 3), "ratio": round(line_s / elapsed, 4),
        })
        day = NOW.replace(hour=0, minute=0) - timedelta(days=1)
        for m in inv[:backfills]:  # the variant word (the meter's constant), cached like the DLMS scalers
            adapter.read_profile_blocking(m, day, day + timedelta(hours=1), 1)
        ex0, b0 = _wire(adapter)
        slots = 0
        t0 = time.perf_counter()
        for m in inv[:backfills]:
            got = adapter.read_profile_blocking(m, day, day + timedelta(days=1), 48)
            slots += sum(1 for s in got if s.wh is not None)
        elapsed = time.perf_counter() - t0
        ex1, b1 = _wire(adapter)
        line_s = _line_s(ex1 - ex0, b1 - b0)
        out.append({
            "run": "backfill_day", "baud": BAUD, "meters": backfills, "slots": slots, "exchanges": ex1 - ex0,
            "bytes": b1 - b0, "seconds": round(elapsed, 3), "line_bound_seconds": round(line_s, 3),
            "ratio": round(line_s / elapsed, 4),
        })
    adapter.close_blocking()
    return out


def main(argv: list[str] | None = None) -> int:
    return line_bench_main("Mercury 230", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
