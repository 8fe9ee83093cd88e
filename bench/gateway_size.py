"""The gateway at size: one `amr gateway` process polling N simulated Modbus TCP meters.

A simulator process serves N meters of 3 energy registers (generic_counter
preset, 100 unit ids per port); the real `amr gateway` runs over an inventory
of them with its spool, reads every meter at once (--now) and then on 15 s
slots. Printed: each cycle's time as the gateway logs it (the first pass
opens the connections and is shown apart), the cycle time beside the bare
pymodbus request rate against the same simulator in the same run (the limit
of the client library and the simulator on this machine: N requests over the
same connections), and the gateway's peak resident memory (VmHWM) against
the budget of a gateway box.

    .venv/bin/python bench/gateway_size.py                 # 10,000 meters, then 1,000 for the memory figure
    .venv/bin/python bench/gateway_size.py --meters 2000   # one size
Targets (issue #19): cycle under 2 s at 10,000 meters; RSS under 80 MB at 1,000.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from poll import free_port_block, start_sim  # noqa: E402
from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

_SLOT = re.compile(r"read (\d+) of (\d+) meters in ([0-9.]+) s")
PER_PORT = 100


async def bare_rate(base: int, ports: int, meters: int) -> float:
    """N holding-register reads (the preset's one request per meter) over one connection per port."""
    clients = [AsyncModbusTcpClient("127.0.0.1", port=base + p, timeout=5, retries=0) for p in range(ports)]
    await asyncio.gather(*(c.connect() for c in clients))
    per = meters // ports

    async def hammer(c: AsyncModbusTcpClient) -> None:
        for u in range(per):
            await c.read_holding_registers(0, count=8, device_id=1 + u % PER_PORT)

    best = 0.0
    for _ in range(2):
        t = time.perf_counter()
        await asyncio.gather(*(hammer(c) for c in clients))
        best = max(best, per * ports / (time.perf_counter() - t))
    for c in clients:
        c.close()
    return best


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(meters: int, cycles: int) -> dict:
    ports = (meters + PER_PORT - 1) // PER_PORT
    tail: list[str] = []
    base = free_port_block(ports)
    with tempfile.TemporaryDirectory() as tmp:
        inv = Path(tmp) / "inventory.toml"
        sim, _ = start_sim(["--inventory-out", str(inv), "--registers", "1.8.0,1.8.1,1.8.2", "tcp",
                            "--meters", str(meters), "--units-per-port", str(PER_PORT), "--base-port", str(base),
                            "--profiles", "20"], "modbus tcp fleet")
        text = inv.read_text().replace('interval = "30m"', 'interval = "15s"')
        if 'interval = "15s"' not in text:
            text = text.replace("[[meter]]\n", '[[meter]]\ninterval = "15s"\n')
        inv.write_text(text)
        env = {**os.environ, "AMR_SPOOL_PATH": str(Path(tmp) / "spool.db"), "AMR_METRICS_PORT": "0",
               "AMR_LOG_FORMAT": "text"}
        env.pop("AMR_DATABASE_URL", None)
        env.setdefault("AMR_MQTT_URL", "mqtt://127.0.0.1:1883")  # the spool drains to the local broker
        cmd = [str(ROOT / ".venv/bin/amr"), "gateway", "--inventory", str(inv), "--now", "--cycles", str(cycles),
               "--jitter", "0", "--concurrency", "200"]
        t0 = time.perf_counter()
        gw = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = [0.0]

        def sample() -> None:
            while gw.poll() is None:
                peak[0] = max(peak[0], peak_rss_mb(gw.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        slots: list[tuple[int, float]] = []
        tail: list[str] = []
        assert gw.stdout is not None
        for line in gw.stdout:
            tail = [*tail[-5:], line.rstrip()]
            m = _SLOT.search(line)
            if m:
                slots.append((int(m.group(1)), float(m.group(3))))
                print(f"  {meters:,} meters: {line.strip()[-90:]}", flush=True)
        gw.wait()
        sampler.join()
        wall = time.perf_counter() - t0
        try:
            bare = asyncio.run(bare_rate(base, ports, meters))
        finally:
            sim.terminate()
            sim.wait(10)
    if gw.returncode != 0 or len(slots) < 2:
        raise RuntimeError(f"gateway exited {gw.returncode} after {len(slots)} slot lines: " + "\n".join(tail))
    steady = [s for _, s in slots[1:]]
    return {"meters": meters, "first_s": slots[0][1], "cycle_s": min(steady),
            "read": min(n for n, _ in slots), "bare_per_s": bare, "rss_mb": peak[0], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meters", type=int, action="append", help="fleet size (repeatable; default 10000 and 1000)")
    ap.add_argument("--cycles", type=int, default=3, help="cycles per run, the first pass included (default 3)")
    args = ap.parse_args()
    for r in [run(n, args.cycles) for n in (args.meters or [10_000, 1_000])]:
        bound_s = r["meters"] / r["bare_per_s"]
        print(f"{r['meters']:>7,} meters: cycle {r['cycle_s']:.2f} s (first pass {r['first_s']:.2f} s, "
              f"{r['read']:,} read); bare pymodbus {bound_s:.2f} s for as many requests: ratio "
              f"{bound_s / r['cycle_s']:.2f}; peak RSS {r['rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
