"""What the serial-line benchmarks share: their command line and how they print a run.

Each (bench/poll_dlms.py, bench/poll_russian.py) reads METERS simulated meters
on one paced line ROUNDS times and back-fills a day of profile from some of
them; `run(meters, rounds, backfills)` returns one dict per measured run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

Run = dict[str, float | int | str]


def line_bench_main(label: str, doc: str | None, run: Callable[[int, int, int], list[Run]],
                    argv: list[str] | None = None) -> int:
    """Parse the shared options, run, print each run (one JSON object with --json)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (about ten seconds)")
    p.add_argument("--meters", type=int, default=16, help="meters on the line (default 16)")
    p.add_argument("--rounds", type=int, help="reads of every meter (default 10, quick 2)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 10)
    backfills = min(args.meters, 4 if args.quick else 16)
    for r in run(args.meters, rounds, backfills):
        if args.json:
            print(json.dumps(r))
        elif r["run"] == "read":
            wire = f", {r['exchanges']} exchanges, {r['bytes']} bytes" if "exchanges" in r else ""
            print(f"{label} {r['baud']} baud, {r['meters_on_line']} meters on one line: {r['reads_per_s']:.3f} "
                  f"reads/s ({r['reads']} in {r['seconds']} s{wire}); line bound "
                  f"{r['line_bound_reads_per_s']:.3f} reads/s; ratio {r['ratio']:.1%}")
        else:
            read = f" ({r['slots']} slots read)" if "slots" in r else ""
            print(f"{label} back-fill of a day (48 slots) for {r['meters']} meters{read}: {r['seconds']} s; "
                  f"line bound {r['line_bound_seconds']} s; ratio {r['ratio']:.1%}")
    return 0
