"""`amr demo` speed: simulated 30-minute slots per wall second against the serial lines' bound.

The demo steps simulated time slot by slot through the real adapters,
scheduler and ingestion. Its floor is the serial lines: every Modbus RTU
frame and every IEC 62056-21 readout must cross a paced pseudo-terminal at
its baud rate. The bound is that wire time, summed over the run from the
frames actually exchanged (RTU: request and response bytes plus the 3.5
character silence after each frame, 10 bits a character; IEC: the bytes of
each readout at the rate each part used). The figure is the slots per
second the whole demo loop achieved (polling, Modbus TCP, ingestion with
validation, intervals and zones, every simulated day committed), beside
the slots per second the wire time alone would allow.

    .venv/bin/python bench/demo.py            # a 31-day month
    .venv/bin/python bench/demo.py --quick    # 3 days
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amr.settings import Settings
from bench._db import scratch_database
from simulators.demo import RTU_BAUD, Demo, DemoOptions

RTU_BITS_PER_CHAR = 10  # 8N1
T35_CHARS = 3.5


def rtu_wire_seconds(demo: Demo) -> float:
    """Wire time of every Modbus RTU read of the run, from the request plans and read counts."""
    total = 0.0
    for meter in demo.scheduler.meters:
        if meter.adapter != "modbus_rtu":
            continue
        rmap = demo.modbus.register_map(meter)
        keys = [k for k in meter.registers if rmap.get(k) is not None]
        chars = 0.0
        for req in demo.modbus.plan(meter, keys):
            chars += 8 + T35_CHARS  # unit, function, address, count, CRC; then silence
            chars += 5 + 2 * req.count + T35_CHARS  # unit, function, byte count, data, CRC; silence
        total += demo.scheduler.state[meter.id].reads * chars * RTU_BITS_PER_CHAR / RTU_BAUD
    return total


def run(days: int, database_url: str) -> dict[str, float | int | str]:
    settings = Settings(database_url=database_url, metrics_port=0)
    demo = Demo(DemoOptions(period=date(2026, 1, 1), days=days, database_url=database_url, mqtt_url=""),
                settings)
    result = demo.run()
    rtu = rtu_wire_seconds(demo)
    iec = demo.iec_adapter.line_seconds
    bound_s = rtu + iec  # the demo runs the RTU pass and the daily IEC readout one after the other
    achieved = result.slots / result.poll_seconds
    bound = result.slots / bound_s
    return {
        "days": days,
        "slots": result.slots,
        "readings_accepted": result.readings["accepted"],
        "poll_seconds": result.poll_seconds,
        "slots_per_s": round(achieved, 1),
        "simulated_days_per_wall_minute": round(achieved * 60 / 48, 1),
        "rtu_wire_s": round(rtu, 3),
        "iec_wire_s": round(iec, 3),
        "line_bound_slots_per_s": round(bound, 1),
        "ratio": round(achieved / bound, 3),
        "rtu_baud": RTU_BAUD,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 simulated days instead of 31")
    p.add_argument("--days", type=int, help="simulated days (default 31, quick 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    days = args.days or (3 if args.quick else 31)
    with scratch_database("amr_bench_demo") as url:
        r = run(days, url)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"amr demo, {r['days']} simulated days ({r['slots']} slots, {r['readings_accepted']} readings stored)")
    print(f"  achieved:   {r['slots_per_s']:>8} slots/s  ({r['simulated_days_per_wall_minute']} simulated days "
          f"per wall minute; polling loop {r['poll_seconds']} s)")
    print(f"  line bound: {r['line_bound_slots_per_s']:>8} slots/s  (serial wire time: RTU {r['rtu_wire_s']} s at "
          f"{r['rtu_baud']} baud, IEC {r['iec_wire_s']} s)")
    print(f"  ratio:      {r['ratio']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
