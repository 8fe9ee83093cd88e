"""`amr poll METER_ID`, `amr scan` and `amr gateway`: the tools of an engineer on site.

`poll` reads one meter of the inventory once and prints what it says;
`scan` walks the unit ids of a Modbus host or serial bus and guesses each
answering device's preset from its probe registers; `gateway` runs the
polling daemon over the whole inventory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from adapters.base import PollError
from amr.errors import UserError
from amr.settings import get_settings
from collector.inventory import InventoryError, Meter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "poll", help="read one meter of the inventory once and print its values with units",
        description=(
            "Read one meter of the inventory (AMR_INVENTORY or --inventory) once, now, and print "
            "every decoded value with its unit: the first thing to run when a meter is added or "
            "a reading looks wrong. Nothing is stored. With --json: one object per value with "
            "the keys register, value (a decimal string), unit, and ts where the meter gives its clock."
        ),
    )
    p.add_argument("meter_id", metavar="METER_ID")
    p.add_argument("--inventory", type=Path, help="inventory file (default: AMR_INVENTORY)")
    p.add_argument("--readings", action="store_true",
                   help="only the registers the gateway stores (the meter's `registers`), as readings")
    p.add_argument("--json", action="store_true", help="one JSON object per value")
    p.set_defaults(func=cmd_poll)

    s = sub.add_parser(
        "scan", help="find the Modbus unit ids that answer on a host or serial bus",
        description=(
            "Ask every unit id in --units on a Modbus TCP host (--host, --port) or an RTU serial "
            "bus (--device, --baudrate) for one register, and list those that answer, with a "
            "guess of their preset from each preset's probe registers. A unit that is silent "
            "costs --timeout seconds, so narrow --units on a slow bus."
        ),
    )
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="Modbus TCP host")
    where.add_argument("--device", help="serial device of an RS-485 bus, e.g. /dev/ttyUSB0")
    s.add_argument("--port", type=int, default=502, help="Modbus TCP port (default 502)")
    s.add_argument("--baudrate", type=int, default=9600)
    s.add_argument("--rtu", action="store_true",
                   help="with --host: RTU frames with CRC over TCP, for an RS-485-to-Ethernet converter in "
                        "transparent mode (not a Modbus TCP gateway)")
    s.add_argument("--units", default="1-247", help="unit ids: '1-247', '1-10,20' (default 1-247)")
    s.add_argument("--timeout", type=float, default=0.3, help="seconds to wait for each unit")
    s.add_argument("--json", action="store_true", help="one JSON object per answering unit")
    s.add_argument("--mercury", action="store_true",
                   help="find the address of a single Incotex Mercury v2 meter (230, 234, 236...) on --device, or "
                        "behind a transparent converter at --host/--port, by asking the broadcast address 0 "
                        "(every meter answers it: with two or more on the line the answers collide)")
    s.add_argument("--password", default=None, help="with --mercury: the level-1 password (default 111111)")
    s.add_argument("--password-encoding", choices=("digits", "ascii"), default="digits",
                   help="with --mercury: how the password is sent (default digits; try ascii if nothing answers)")
    s.add_argument("--dlms", action="store_true",
                   help="find DLMS/COSEM (SPODES) meters over HDLC on --device, or behind a transparent converter "
                        "at --host/--port: each physical address in --addresses that answers SNRM and associates as "
                        "the public client (16), with its serial number (0.0.96.1.0.255)")
    s.add_argument("--addresses", default="16-127",
                   help="with --dlms: HDLC physical addresses, '16-127', '17,42,100-120' (0..16383; default 16-127)")
    s.set_defaults(func=cmd_scan)

    g = sub.add_parser(
        "gateway", help="run the polling daemon over the whole inventory",
        description=(
            "Poll every Modbus and IEC 62056-21 meter of the inventory on its interval, aligned to "
            "the wall clock, and hand the readings on. --sink spool (default) keeps them in the "
            "local spool (AMR_SPOOL_PATH) and an uplink drains it to MQTT (AMR_MQTT_URL) or to the "
            "database (AMR_DATABASE_URL); --sink direct writes to the database in batches. The "
            "inventory is checked completely first and refused with every problem. SIGHUP reloads "
            "the inventory; SIGTERM stops after the running slot. Metrics on AMR_METRICS_PORT. "
            "Before each wait of 5 s or more it logs the next slot in local time (AMR_TIMEZONE), "
            "like `next slot at 12:30:00 MSK (in 14 min) for 40 meters every 30 min`. --now reads "
            "every meter at once before following the slots: `amr gateway --now --cycles 1` polls "
            "once and exits, a quick check of a new inventory."
        ),
    )
    g.add_argument("--inventory", type=Path, help="inventory file (default: AMR_INVENTORY)")
    g.add_argument("--sink", choices=("spool", "direct"), default="spool",
                   help="spool: store and forward through AMR_SPOOL_PATH (default); direct: to the database")
    g.add_argument("--concurrency", type=int, default=100, help="Modbus TCP reads in flight at once")
    g.add_argument("--jitter", type=float, default=2.0, help="seconds of per-meter spread after each slot start")
    g.add_argument("--cycles", type=int, help="stop after this many slots per interval (default: run on)")
    g.add_argument("--now", action="store_true",
                   help="a first pass over every meter right away (counted as a cycle), then the slots; "
                        "without it the first read waits for the next slot, up to a whole interval")
    g.set_defaults(func=cmd_gateway)


def _inventory_path(arg: Path | None) -> Path:
    path = arg or get_settings().inventory
    if path is None:
        raise UserError("no inventory: pass --inventory FILE or set AMR_INVENTORY")
    return path


def _checked_for(path: Path, meter_id: str) -> Any:
    """The inventory, refused only for problems of this meter: on site, one bad entry
    elsewhere must not stop an engineer reading the meter in front of them."""
    from collector.gateway.daemon import check_inventory
    from collector.inventory import load_inventory

    try:
        return check_inventory(path)
    except InventoryError as exc:
        mine = [p for p in exc.problems if f"meter {meter_id!r}" in p or f"(id {meter_id!r})" in p]
        try:
            inv = load_inventory(path)
        except InventoryError:
            mine = mine or exc.problems
            inv = None
        if mine or inv is None:
            raise UserError(f"{len(mine)} problem(s) with meter {meter_id!r}:\n" + "\n".join(mine)) from None
        print(f"warning: {len(exc.problems)} problem(s) with other meters of {path}; "
              "`amr gateway` refuses the file until they are fixed", file=sys.stderr)
        return inv


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


# --- amr poll -----------------------------------------------------------------


async def _poll_modbus(meter: Meter, path: Path, readings_only: bool) -> list[dict[str, Any]]:
    from adapters.modbus import ModbusAdapter

    adapter = ModbusAdapter(get_settings(), base_dir=path.resolve().parent)
    try:
        if readings_only:
            return [
                {"register": r.register, "value": r.value, "unit": "kWh", "quality": sorted(r.quality)}
                for r in await adapter.read(meter)
            ]
        values = await adapter.read_values(meter)
    finally:
        await adapter.close()
    clock = next((v for v in values if v.key == "clock"), None)
    meter_ts = datetime.fromtimestamp(int(clock.value), UTC) if clock is not None else None
    out = []
    for v in values:
        row: dict[str, Any] = {"register": v.key, "value": v.value, "unit": v.unit}
        if meter_ts is not None:
            row["ts"] = meter_ts
        out.append(row)
    return out


async def _poll_iec(meter: Meter) -> list[dict[str, Any]]:
    from adapters.iec62056 import Iec62056Adapter

    adapter = Iec62056Adapter(get_settings())
    try:
        ro = await asyncio.to_thread(adapter.readout, meter)
    finally:
        await adapter.close()
    out = []
    for ds in ro.data.values():
        row: dict[str, Any] = {"register": ds.register, "value": ds.value, "unit": ds.unit or ""}
        if ro.meter_time is not None:
            row["ts"] = ro.meter_time
        out.append(row)
    return out


async def _poll_mercury(meter: Meter) -> list[dict[str, Any]]:
    """Every energy register of the meter's tariffs (not only the configured ones), the clock and,
    for v2, the transformer ratios; a register the meter does not measure shows 'not measured'."""
    from adapters import mercury as mc
    from adapters.mercury_adapter import MercuryAdapter

    adapter = MercuryAdapter(get_settings())
    wide = meter.model_copy(update={"registers": tuple(
        mc.ENERGY_REGISTERS if meter.adapter == "mercury230" else mc.V1_REGISTERS)})
    try:
        p = await asyncio.to_thread(adapter.poll, wide, True)
    finally:
        await adapter.close()
    out: list[dict[str, Any]] = []
    for reg, wh in p.energy.items():
        row: dict[str, Any] = {"register": reg, "value": "not measured" if wh is None else mc.kwh(wh),
                               "unit": "" if wh is None else "kWh" if reg[0] in "12" else "kvarh"}
        if p.meter_time is not None:
            row["ts"] = p.meter_time
        out.append(row)
    if p.transformer is not None:
        out.append({"register": "transformer_ratio_u", "value": p.transformer[0], "unit": ""})
        out.append({"register": "transformer_ratio_i", "value": p.transformer[1], "unit": ""})
    return out


async def _poll_dlms(meter: Meter) -> list[dict[str, Any]]:
    """Every energy register of the SPODES table (not only the configured ones) with the meter's clock;
    a register the meter does not have is left out."""
    from adapters.dlms import SPEC, DlmsAdapter

    adapter = DlmsAdapter(get_settings())
    try:
        p = await asyncio.to_thread(adapter.poll_available, meter, tuple(SPEC.registers))
    finally:
        await adapter.close()
    return [{"register": reg, "value": value, "unit": p.units[reg], "ts": p.meter_time}
            for reg, value in p.values.items()]


def _cmd_scan_dlms(args: argparse.Namespace) -> int:
    from adapters.dlms import DlmsAdapter
    from adapters.dlms import scan as scan_dlms

    addresses: list[int] = []
    for part in args.addresses.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"--addresses: {part!r} is not a number or a range like 16-127") from None
        if not 0 <= a <= b <= 16383:
            raise UserError(f"--addresses: {part!r} is outside 0..16383")
        addresses += range(a, b + 1)
    adapter = DlmsAdapter(get_settings())
    try:
        found = scan_dlms(adapter, device=args.device, host=args.host, tcp_port=args.port if args.host else None,
                          baudrate=args.baudrate, addresses=sorted(set(addresses)), timeout=args.timeout)
    except PollError as exc:
        raise UserError(f"{exc.outcome}: {exc}") from None
    finally:
        adapter.close_blocking()
    where = f"{args.host}:{args.port}" if args.host else f"{args.device} at {args.baudrate} baud"
    for f in found:
        if args.json:
            _emit({"bus": where, "adapter": "dlms", "physical_address": f["physical_address"], "serial": f["serial"],
                   "note": f["note"]})
        else:
            print(f"physical address {f['physical_address']:>5}: dlms, serial {f['serial'] or 'unknown'}"
                  + (f" ({f['note']})" if f["note"] else ""))
    sys.stdout.flush()
    if not args.json:
        print(f"{len(found)} of {len(set(addresses))} physical addresses answered on {where}", file=sys.stderr)
    return 0


def cmd_poll(args: argparse.Namespace) -> int:
    path = _inventory_path(args.inventory)
    inv = _checked_for(path, args.meter_id)
    meter = inv.meters.get(args.meter_id)
    if meter is None:
        known = ", ".join(sorted(inv.meters)[:10])
        raise UserError(f"no meter {args.meter_id!r} in {path} (meters: {known}{', ...' if len(inv.meters) > 10 else ''})")
    try:
        if meter.adapter.startswith("modbus"):
            rows = asyncio.run(_poll_modbus(meter, path, args.readings))
        elif meter.adapter == "iec62056":
            rows = asyncio.run(_poll_iec(meter))
        elif meter.adapter in ("mercury230", "mercury200"):
            rows = asyncio.run(_poll_mercury(meter))
        elif meter.adapter == "dlms":
            rows = asyncio.run(_poll_dlms(meter))
        else:
            raise UserError(f"meter {meter.id}: adapter {meter.adapter!r} is not polled (it publishes or is read by hand)")
    except PollError as exc:
        raise UserError(f"{exc.outcome}: {exc}") from None
    if not args.json:
        clock = next((r["ts"] for r in rows if "ts" in r), None)
        where = (f"unit {meter.unit}, preset {meter.preset}" if meter.adapter.startswith("modbus")
                 else f"address {meter.address or '(none)'}")
        print(f"meter {meter.id} ({meter.adapter} on {meter.bus_name}, {where})"
              + (f", meter clock {clock.isoformat()}" if clock else ""))
    for row in rows:
        if args.json:
            _emit({k: (str(v) if isinstance(v, Decimal) else v.isoformat() if isinstance(v, datetime) else v)
                   for k, v in row.items()})
        else:
            print(f"  {row['register']:<20} {row['value']!s:>16} {row['unit']}")
    return 0


# --- amr scan ---------------------------------------------------------------------


def parse_units(text: str) -> list[int]:
    """'1-10,20' -> [1..10, 20]; refuses ids outside 1..247."""
    units: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"--units: {part!r} is not a number or a range like 1-10") from None
        if not 1 <= a <= b <= 247:
            raise UserError(f"--units: {part!r} is outside 1..247")
        units += range(a, b + 1)
    return sorted(set(units))


async def scan(
    *, host: str | None, port: int, device: str | None, baudrate: int, units: list[int], timeout: float,
    rtu: bool = False,
) -> list[dict[str, Any]]:
    """Every unit that answers, with the presets whose probes it passes (most specific first).

    rtu with host: the bus is behind an RS-485-to-Ethernet converter that passes RTU frames.
    """
    from adapters.modbus import ModbusAdapter
    from adapters.registermap import available_presets, load_register_map

    converter = bool(host and rtu)
    base = Meter(
        id="scan", account="0", adapter="modbus_tcp" if host and not converter else "modbus_rtu", host=host,
        port=None if converter else port if host else device, tcp_port=port if converter else None,
        unit=1, baudrate=baudrate, timeout=timeout,
    )
    maps = [load_register_map(p) for p in available_presets()]
    adapter = ModbusAdapter(get_settings(), clock_tolerance_s=60)
    found = []
    try:
        for unit in units:
            cache: dict[tuple, Decimal | None] = {}
            answered = silent = False
            for m in maps:
                for p in m.probes:
                    key = (p.function, p.address, p.type)
                    if key in cache:
                        continue
                    try:
                        cache[key] = await adapter.probe(base, p.as_register(), unit)
                        answered = True
                    except PollError as exc:
                        cache[key] = None
                        if exc.outcome == "exception" and "(gateway" not in str(exc):
                            answered = True  # a Modbus exception is an answer: someone is there
                        elif exc.outcome == "refused":
                            raise UserError(str(exc)) from None
                        elif not answered:
                            # no answer, or a TCP gateway saying nobody is behind it: nobody at this unit
                            silent = True
                            break
                if silent:
                    break
            if not answered:
                continue
            matches = [
                m for m in maps if m.probes and all(
                    (v := cache.get((p.function, p.address, p.type))) is not None and p.min <= v <= p.max
                    for p in m.probes
                )
            ]
            # a model code answered exactly (min == max) outweighs any number of plausible ranges:
            # an SDM230 also passes the SDM220's voltage and phase-angle probes
            matches.sort(key=lambda m: (-sum(p.min == p.max for p in m.probes), -len(m.probes)))
            found.append({"unit": unit, "presets": [m.name for m in matches]})
    finally:
        await adapter.close()
    return found


def scan_mercury(
    *, host: str | None, port: int, device: str | None, baudrate: int, timeout: float,
    password: str | None, password_encoding: str,
) -> dict[str, Any]:
    """The address and serial number of the single Mercury v2 meter on a line (broadcast address 0)."""
    from adapters.mercury_adapter import LineMeter, MercuryAdapter

    line = LineMeter(port=device, host=host, tcp_port=port if host else None, baudrate=baudrate,
                     timeout=max(timeout, 0.3), password=password, password_encoding=password_encoding)
    adapter = MercuryAdapter(get_settings())
    try:
        return adapter.find_single(line)
    finally:
        adapter.close_blocking()


def _cmd_scan_mercury(args: argparse.Namespace) -> int:
    where = f"{args.host}:{args.port}" if args.host else f"{args.device} at {args.baudrate} baud"
    try:
        got = scan_mercury(host=args.host, port=args.port, device=args.device, baudrate=args.baudrate,
                           timeout=args.timeout, password=args.password, password_encoding=args.password_encoding)
    except PollError as exc:
        raise UserError(f"no Mercury found on {where}: {exc.outcome}: {exc}") from None
    if args.json:
        _emit({"bus": where, "adapter": "mercury230", "address": got["address"], "serial": got["serial"]})
    else:
        print(f"address {got['address']:>3}: mercury230, serial {got['serial'] or 'unknown'}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    if args.mercury:
        return _cmd_scan_mercury(args)
    if args.dlms:
        return _cmd_scan_dlms(args)
    if args.rtu and not args.host:
        raise UserError("--rtu: give the converter's --host (and --port); on a serial --device RTU is the default")
    units = parse_units(args.units)
    found = asyncio.run(
        scan(host=args.host, port=args.port, device=args.device, baudrate=args.baudrate, units=units,
             timeout=args.timeout, rtu=args.rtu)
    )
    where = (f"{args.host}:{args.port}" + (" (RTU over TCP)" if args.rtu else "") if args.host
             else f"{args.device} at {args.baudrate} baud")
    for f in found:
        if args.json:
            _emit({"bus": where, "unit": f["unit"], "preset": f["presets"][0] if f["presets"] else None,
                   "candidates": f["presets"]})
        else:
            guess = f["presets"][0] if f["presets"] else "unknown (no preset's probe matches)"
            also = f" (also matches {', '.join(f['presets'][1:])})" if len(f["presets"]) > 1 else ""
            print(f"unit {f['unit']:>3}: {guess}{also}")
    sys.stdout.flush()
    if not args.json:
        print(f"{len(found)} of {len(units)} unit ids answered on {where}", file=sys.stderr)
    return 0


# --- amr gateway -------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    from amr import logs
    from amr.metrics_http import serve_metrics
    from collector.fleet import stale_meters
    from collector.gateway.daemon import load_gateway_config, make_sink, run_gateway

    settings = get_settings()
    logs.setup("INFO", settings.log_format)
    path = _inventory_path(args.inventory)
    config = load_gateway_config(path)  # read once; a broken inventory is refused before opening anything
    try:
        sink = make_sink(settings, args.sink)
    except InventoryError as exc:
        raise UserError(str(exc)) from None
    # with the database at hand (direct mode) it also shows amr_db_up and amr_meters_stale
    endpoint = serve_metrics(settings, db_url=settings.database_url if args.sink == "direct" else None,
                             stale=stale_meters)
    log = logging.getLogger("amr.gateway")
    try:
        asyncio.run(
            run_gateway(
                path, sink, settings, cycles=args.cycles, config=config, first_now=args.now,
                scheduler_options={"tcp_concurrency": args.concurrency, "jitter_s": args.jitter},
            )
        )
    except KeyboardInterrupt:
        log.info("gateway stopped")
    finally:
        sink.close()
        if endpoint is not None:
            endpoint.close()
    return 0
