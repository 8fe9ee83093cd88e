"""Polling throughput: Modbus TCP fleet cycle time and Modbus RTU line utilisation.

(a) Modbus TCP: one gateway process (this one) runs the scheduler over N
    simulated meters (3 energy registers each, generic_counter preset) served
    by a simulator in its own process; it reports the time of one full cycle
    and meter reads/s, beside the bare pymodbus request rate against the same
    simulator over the same number of connections in the same run (the limit
    of the client library and the simulator on this machine).
(b) Modbus RTU: the scheduler reads M meters in turn on one bus served by the
    simulator on a pseudo-terminal paced at 9600 baud; it reports reads/s as a
    fraction of the line bound computed from the frame sizes and the
    inter-frame gap: per read, (8-byte request + 5+2n-byte answer) character
    times + 2 x t3.5.

    .venv/bin/python bench/poll.py            # 1,000 TCP meters, 5 cycles; RTU 16 meters, 5 cycles
    .venv/bin/python bench/poll.py --quick    # 200 TCP meters, 2 cycles; RTU 4 meters, 3 cycles
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from adapters.modbus import ModbusAdapter  # noqa: E402
from adapters.registermap import load_register_map, plan_requests  # noqa: E402
from amr.settings import Settings  # noqa: E402
from collector.gateway.scheduler import Scheduler  # noqa: E402
from collector.inventory import Meter  # noqa: E402


class CountingSink:
    def __init__(self) -> None:
        self.n = 0

    def put(self, items: list) -> None:
        self.n += len(items)


def free_port_block(n: int) -> int:
    """A base port with n free ports after it (checked by binding)."""
    import socket

    for base in range(20000, 60000, 997):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def start_sim(args: list[str], expect: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.modbus_sim", *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if expect not in line:
        proc.kill()
        raise RuntimeError(f"simulator did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.strip()


async def tcp_bench(meters: int, per_port: int, cycles: int, concurrency: int) -> dict:
    ports = (meters + per_port - 1) // per_port
    base = free_port_block(ports)
    proc, _ = start_sim(["tcp", "--meters", str(meters), "--units-per-port", str(per_port),
                         "--base-port", str(base), "--profiles", "20"], "modbus tcp fleet")
    try:
        ms = [
            Meter(id=f"b{i}", account="1", adapter="modbus_tcp", preset="generic_counter", host="127.0.0.1",
                  port=base + i // per_port, unit=1 + i % per_port, timeout=5.0, interval="30m",
                  registers=("1.8.0", "1.8.1", "1.8.2"))
            for i in range(meters)
        ]
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        sink = CountingSink()
        sched = Scheduler(ms, lambda m: adapter, sink, jitter_s=0.0, tcp_concurrency=concurrency)
        rmap = load_register_map("generic_counter")
        reqs = plan_requests(rmap.select(["1.8.0", "1.8.1", "1.8.2", "clock"]), rmap.max_request, rmap.max_gap)
        # the bare library: the same connections, the same request, no scheduler, no decoding
        clients = [AsyncModbusTcpClient("127.0.0.1", port=base + p, timeout=5, retries=0, reconnect_delay=0)
                   for p in range(ports)]
        await asyncio.gather(*(c.connect() for c in clients))
        req = reqs[0]
        per_client = max(1, meters // ports)

        async def hammer(c: AsyncModbusTcpClient, n: int, unit: int) -> None:
            for _ in range(n):
                await c.read_holding_registers(req.address, count=req.count, device_id=unit)

        # cycles of the gateway and of the bare library alternate, so both see the same machine load
        times, bare = [], []
        for c in range(cycles + 1):  # the first cycle opens the connections: not counted
            t = time.perf_counter()
            report = await sched.run_slot(ms, datetime.now(UTC), timedelta(minutes=30))
            took = time.perf_counter() - t
            if len(report.read) != meters:
                raise RuntimeError(f"cycle {c}: read {len(report.read)} of {meters}: {report.errors[:3]}")
            t = time.perf_counter()
            await asyncio.gather(*(hammer(cl, per_client, 1 + (i % per_port)) for i, cl in enumerate(clients)))
            bare_s = time.perf_counter() - t
            if c:
                times.append(took)
                bare.append(per_client * ports / bare_s)
        await adapter.close()
        for cl in clients:
            cl.close()
    finally:
        proc.terminate()
        proc.wait(10)
    best = min(times)
    return {
        "meters": meters, "requests_per_read": len(reqs), "cycle_s_best": best,
        "cycle_s_mean": sum(times) / len(times), "reads_per_s": meters / best,
        "bare_requests_per_s": max(bare), "readings": sink.n,
    }


async def rtu_bench(meters: int, cycles: int, baud: int) -> dict:
    units = ",".join(str(u) for u in range(1, meters + 1))
    proc, line = start_sim(["--preset", "eastron_sdm120", "rtu", "--units", units, "--baudrate", str(baud)],
                           "modbus rtu bus")
    device = line.rsplit(" on ", 1)[1]
    try:
        ms = [
            Meter(id=f"r{u}", account="1", adapter="modbus_rtu", preset="eastron_sdm120", port=device,
                  unit=u, baudrate=baud, timeout=1.0, interval="30m", registers=("1.8.0", "2.8.0"))
            for u in range(1, meters + 1)
        ]
        adapter = ModbusAdapter(Settings(), clock_tolerance_s=60)
        sched = Scheduler(ms, lambda m: adapter, CountingSink(), jitter_s=0.0)
        rmap = load_register_map("eastron_sdm120")
        (req,) = plan_requests(rmap.select(["1.8.0", "2.8.0"]), rmap.max_request, rmap.max_gap)
        # one untimed cycle: opens the port and lets each simulated meter build its history
        await sched.run_slot(ms, datetime.now(UTC), timedelta(minutes=30))
        t = time.perf_counter()
        reads = 0
        for _ in range(cycles):
            report = await sched.run_slot(ms, datetime.now(UTC), timedelta(minutes=30))
            if len(report.read) != meters:
                raise RuntimeError(f"read {len(report.read)} of {meters}: {report.errors[:3]}")
            reads += meters
        took = time.perf_counter() - t
        await adapter.close()
    finally:
        proc.terminate()
        proc.wait(10)
    char = 10 / baud  # 8N1
    t35 = 3.5 * char if baud <= 19200 else 0.00175
    frame_s = (8 + 5 + 2 * req.count) * char + 2 * t35
    return {
        "baud": baud, "meters": meters, "registers_per_read": req.count, "reads_per_s": reads / took,
        "bound_reads_per_s": 1 / frame_s, "fraction": (reads / took) * frame_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run for a quick check")
    parser.add_argument("--meters", type=int, help="TCP meters (default 1000, quick 200)")
    parser.add_argument("--units-per-port", type=int, default=10, help="TCP meters behind one port")
    parser.add_argument("--concurrency", type=int, default=100, help="scheduler bound on TCP reads in flight")
    parser.add_argument("--rtu-meters", type=int, help="meters on the RTU bus (default 16, quick 4)")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--only", choices=("tcp", "rtu"), help="run one half only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    os.chdir(ROOT)
    meters = args.meters or (200 if args.quick else 1000)
    cycles = 2 if args.quick else 5
    if args.only != "rtu":
        report_tcp(asyncio.run(tcp_bench(meters, args.units_per_port, cycles, args.concurrency)), meters, args)
    if args.only != "tcp":
        report_rtu(asyncio.run(rtu_bench(args.rtu_meters or (4 if args.quick else 16), 3 if args.quick else 5,
                                         args.baud)))
    return 0


def report_tcp(tcp: dict, meters: int, args: argparse.Namespace) -> None:
    print(f"(a) Modbus TCP, {tcp['meters']} meters x 3 registers ({tcp['requests_per_read']} request per read), "
          f"{meters // args.units_per_port} connections, concurrency {args.concurrency}")
    print(f"    full cycle: {tcp['cycle_s_best']:.3f} s best, {tcp['cycle_s_mean']:.3f} s mean "
          f"(target < 2 s for 1,000 meters)")
    print(f"    meter reads/s: {tcp['reads_per_s']:.0f}   bare pymodbus requests/s, same simulator: "
          f"{tcp['bare_requests_per_s']:.0f}   ratio: {tcp['reads_per_s'] / tcp['bare_requests_per_s']:.2f}")


def report_rtu(rtu: dict) -> None:
    print(f"(b) Modbus RTU at {rtu['baud']} baud, {rtu['meters']} meters in turn, "
          f"{rtu['registers_per_read']} registers a read")
    print(f"    meter reads/s: {rtu['reads_per_s']:.2f}   line bound: {rtu['bound_reads_per_s']:.2f}   "
          f"fraction: {rtu['fraction']:.1%} (target >= 90%)")
    print(f"    per read: {1000 / rtu['reads_per_s']:.2f} ms, of which the line needs "
          f"{1000 / rtu['bound_reads_per_s']:.2f} ms (request, t3.5, answer, t3.5)")


if __name__ == "__main__":
    sys.exit(main())
