"""IEC 62056-21 readouts per second against the line bound of the bytes exchanged.

A mode C readout moves a fixed number of characters at known rates (sign-on,
identification and option select at the initial rate, the data message at
the readout rate). The line bound is the time those characters need on the
wire, summed over every readout of the run; the figure is the readouts per
second the adapter achieved against simulated meters on a paced
pseudo-terminal, beside the readouts per second the bound allows.

Two runs: (a) 9600 baud from the sign-on (no rate change), (b) sign-on at
300 baud and readout at 9600 after the option select. Meter reaction time
is set to zero so that only the line and our code are measured.

    .venv/bin/python bench/poll_iec.py            # 200 readouts at 9600, 20 at 300->9600
    .venv/bin/python bench/poll_iec.py --quick    # 30 and 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.iec62056 import Iec62056Adapter
from amr.settings import Settings
from collector.inventory import Meter
from simulators.iec62056_sim import REGISTERS, IecLineSim, SimMeter


def run(initial: int, readouts: int, meters: int, reaction: float) -> dict[str, float]:
    sims = [
        SimMeter(address=f"{i + 1:08d}" if meters > 1 else "", serial_number=f"{i + 1:08d}", seed=i + 1)
        for i in range(meters)
    ]
    adapter = Iec62056Adapter(Settings())
    with IecLineSim(sims, baudrate=initial, reaction_s=reaction) as sim:
        inv = [
            Meter(id=f"m{i}", account="1", adapter="iec62056", port=sim.device, baudrate=initial,
                  address=sm.address or None, registers=REGISTERS, timeout=2.0)
            for i, sm in enumerate(sims)
        ]
        for m in inv:  # open the port and fill each consumption model's cache untimed
            adapter.readout(m)
        line_s = 0.0
        t0 = time.perf_counter()
        for k in range(readouts):
            m = inv[k % meters]
            ro = adapter.readout(m)
            adapter.readings(m, ro)
            line_s += ro.line_seconds()
        elapsed = time.perf_counter() - t0
    adapter.close_blocking()
    achieved = readouts / elapsed
    bound = readouts / line_s
    return {
        "initial_baud": initial,
        "readout_baud": 9600,
        "meters_on_line": meters,
        "readouts": readouts,
        "seconds": round(elapsed, 3),
        "readouts_per_s": round(achieved, 3),
        "line_bound_readouts_per_s": round(bound, 3),
        "ratio": round(achieved / bound, 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    p.add_argument("--readouts", type=int, help="readouts at 9600 (default 200, quick 30)")
    p.add_argument("--meters", type=int, default=4, help="meters on the multi-drop line (default 4)")
    p.add_argument("--reaction", type=float, default=0.0, help="meter reaction time, s (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = p.parse_args(argv)
    n = args.readouts or (30 if args.quick else 200)
    results = [
        run(9600, n, args.meters, args.reaction),
        run(300, max(2, n // 10), args.meters, args.reaction),
    ]
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            print(
                f"IEC 62056-21 {r['initial_baud']}->{r['readout_baud']} baud, "
                f"{r['meters_on_line']} meters on one line: {r['readouts_per_s']:.3f} readouts/s "
                f"({r['readouts']} in {r['seconds']} s); line bound "
                f"{r['line_bound_readouts_per_s']:.3f} readouts/s; ratio {r['ratio']:.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
