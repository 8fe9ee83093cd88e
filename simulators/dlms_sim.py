"""A SPODES (DLMS/COSEM) meter: HDLC on a paced pseudo-terminal, and the TCP wrapper.

Each simulated meter has the objects a household SPODES meter gives a reader
(client 32, low-level security): the A+ registers total and per tariff with
their scaler_unit, A- (zero), the clock, the serial number, the 30-minute
load profile (1.0.99.1.0.255: clock and the interval's A+ energy in Wh),
the daily (1.0.98.2.0.255) and monthly (1.0.98.1.0.255) profiles of the
cumulative registers. Values come from the shared consumption model, so a
test knows what the meter holds at any instant:

- a register is the model's counter at the meter's "now", in units of
  10**scaler Wh (scaler 1 by default: the model's 0.01 kWh step is exact);
- a load-profile slot's energy is the difference of the counter at its two
  ends, in Wh (`slot_wh`), so the slots of a day add up to the register's
  increase exactly.

Faults, by name in `SimMeter.faults`: `bad_crc` (every FCS it sends is
wrong), `garbage` (noise instead of answers), `silent` (no answer at all),
`missing_profile` (the slots in `missing_slots` are absent from the buffer);
a wrong password is a password other than `password` (the AARE rejects it
with authentication-failure); `clock_offset_s` puts the clock far off.

The HDLC side serves any number of meters on one line, each at its
physical address, and answers only frames addressed to it, as on an RS-485
bus. The codec is the adapter's (`adapters.hdlc`, `adapters.cosem`); the
tests check this simulator against gurux-dlms, an independent implementation.
"""

from __future__ import annotations

import argparse
import random
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from adapters import cosem, hdlc
from adapters.cosem import (
    enc_array,
    enc_enum,
    enc_i8,
    enc_octets,
    enc_struct,
    enc_u16,
    enc_u32,
)
from simulators.consumption import ConsumptionModel
from simulators.serial_line import PtyLine

MSK = ZoneInfo("Europe/Moscow")
CLOCK = cosem.obis_bytes("0.0.1.0.0.255")
SERIAL = cosem.obis_bytes("0.0.96.1.0.255")
LOAD = cosem.obis_bytes("1.0.99.1.0.255")
DAILY = cosem.obis_bytes("1.0.98.2.0.255")
MONTHLY = cosem.obis_bytes("1.0.98.1.0.255")
A_PLUS_INTERVAL = cosem.obis_bytes("1.0.1.29.0.255")
PERIOD = 1800
REGISTERS = {  # logical name -> the model's register (None: always 0)
    cosem.obis_bytes("1.0.1.8.0.255"): "1.8.0",
    cosem.obis_bytes("1.0.1.8.1.255"): "1.8.1",
    cosem.obis_bytes("1.0.1.8.2.255"): "1.8.2",
    cosem.obis_bytes("1.0.1.8.3.255"): "1.8.3",
    cosem.obis_bytes("1.0.2.8.0.255"): None,
}
BILLING_COLUMNS = [cosem.obis_bytes(f"1.0.1.8.{t}.255") for t in range(4)]
BLOCK_SIZE = 400  # bytes of a GET answer per data block
PROFILE_DEPTH = timedelta(days=60)


def _now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass
class SimMeter:
    """One simulated SPODES meter."""

    physical_address: int | None = 17
    password: str = "12345678"
    seed: int = 1
    serial: str = "SIM00000001"
    scaler: int = 1  # registers in units of 10**scaler Wh
    clock_offset_s: float = 0.0
    now: Callable[[], datetime] = _now_utc
    faults: set[str] = field(default_factory=set)
    missing_slots: set[datetime] = field(default_factory=set)  # slot starts (UTC) absent from the profile
    model: ConsumptionModel = field(init=False)
    # what the meter has been asked, for tests
    associations: int = 0
    rejected: int = 0
    clock_shifts: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model = ConsumptionModel(seed=self.seed)

    # what a test can compute
    def meter_time(self) -> datetime:
        return self.now() + timedelta(seconds=self.clock_offset_s)

    def register_wh(self, register: str, at: datetime) -> int:
        return int(self.model.energy_kwh(at, register) * 1000)

    def slot_wh(self, start: datetime) -> int:
        """The Wh of the 30-minute slot starting at start (UTC, aligned)."""
        end = start + timedelta(seconds=PERIOD)
        return self.register_wh("1.8.0", end) - self.register_wh("1.8.0", start)

    def register_raw(self, register: str | None, at: datetime) -> int:
        if register is None:
            return 0
        return self.register_wh(register, at) // 10**self.scaler


class CosemServer:
    """The application layer of one meter for one association (state: associated, blocks)."""

    def __init__(self, meter: SimMeter):
        self.meter = meter
        self.associated = False
        self.client = 0
        self.blocks: list[bytes] = []

    def handle(self, apdu: bytes, client: int) -> bytes:
        tag = apdu[:1]
        if tag == b"\x60":
            return self._aarq(apdu, client)
        if tag == b"\x62":
            self.associated = False
            return cosem.RLRE
        if not self.associated:
            return bytes((cosem.EXCEPTION_RESPONSE, 1, 2))  # state error: service not allowed
        try:
            if tag == bytes((cosem.GET_REQUEST,)):
                return self._get(cosem.decode_get_request(apdu))
            if tag == bytes((cosem.SET_REQUEST,)):
                return self._set(apdu)
            if tag == bytes((cosem.ACTION_REQUEST,)):
                return self._action(apdu)
        except cosem.CosemError:
            return bytes((cosem.EXCEPTION_RESPONSE, 2, 1))
        return bytes((cosem.EXCEPTION_RESPONSE, 2, 2))

    def _aarq(self, apdu: bytes, client: int) -> bytes:
        req = cosem.decode_aarq(apdu)
        m = self.meter
        if req.context != cosem.LN_NO_CIPHERING:
            return cosem.encode_aare(1, 2)
        if client != hdlc.CLIENT_PUBLIC:
            if req.password is None:
                m.rejected += 1
                return cosem.encode_aare(1, 14)
            if req.password != m.password.encode("latin-1"):
                m.rejected += 1
                return cosem.encode_aare(1, 13)
        self.associated = True
        self.client = client
        m.associations += 1
        return cosem.encode_aare(0, 0, 0x00501F, 500)

    # GET

    def _get(self, req: cosem.GetRequest) -> bytes:
        if req.kind == cosem.NEXT:
            if not self.blocks or req.block >= len(self.blocks) or req.block < 1:
                return cosem.encode_get_response(None, 19, req.invoke)
            n = req.block + 1
            return cosem.encode_get_block(n, n == len(self.blocks), self.blocks[req.block], req.invoke)
        value = self._value(req)
        if isinstance(value, int):
            return cosem.encode_get_response(None, value, req.invoke)
        if len(value) <= BLOCK_SIZE:
            return cosem.encode_get_response(value, None, req.invoke)
        self.blocks = [value[i : i + BLOCK_SIZE] for i in range(0, len(value), BLOCK_SIZE)]
        return cosem.encode_get_block(1, len(self.blocks) == 1, self.blocks[0], req.invoke)

    def _value(self, req: cosem.GetRequest) -> bytes | int:
        """The A-XDR value of the attribute, or a data-access-result error code."""
        m = self.meter
        now = m.meter_time()
        obis, attr, cls = req.obis, req.attribute, req.class_id
        if obis == CLOCK and cls == 8:
            if attr == 2:
                return enc_octets(cosem.encode_datetime(now.astimezone(MSK)))
            return 4
        if obis == SERIAL and cls == 1 and attr == 2:
            return enc_octets(m.serial.encode("ascii"))
        if obis in REGISTERS and cls == 3:
            if attr == 2:
                return enc_u32(m.register_raw(REGISTERS[obis], now))
            if attr == 3:
                return enc_struct(enc_i8(m.scaler), enc_enum(30))
            return 4
        if obis == A_PLUS_INTERVAL and cls == 3:
            if attr == 3:
                return enc_struct(enc_i8(0), enc_enum(30))
            if attr == 2:
                return enc_u32(m.slot_wh(_slot_floor(now) - timedelta(seconds=PERIOD)))
            return 4
        if obis in (LOAD, DAILY, MONTHLY) and cls == 7:
            return self._profile(obis, attr, req)
        return 4  # object-undefined

    def _profile(self, obis: bytes, attr: int, req: cosem.GetRequest) -> bytes | int:
        m = self.meter
        if obis == LOAD:
            columns = [(8, CLOCK), (3, A_PLUS_INTERVAL)]
            period = PERIOD
        else:
            columns = [(8, CLOCK)] + [(3, c) for c in BILLING_COLUMNS]
            period = 86400 if obis == DAILY else 0
        if attr == 3:
            return enc_array([enc_struct(enc_u16(c), enc_octets(ln), enc_i8(2), enc_u16(0)) for c, ln in columns])
        if attr == 4:
            return enc_u32(period)
        if attr == 7:
            return enc_u32(len(self._stamps(obis, None, None)))
        if attr != 2:
            return 4
        lo = hi = None
        if req.access_selector == 1:
            try:
                lo = cosem.decode_datetime(req.access[1], MSK)
                hi = cosem.decode_datetime(req.access[2], MSK)
            except (cosem.CosemError, IndexError, TypeError):
                return 12  # type-unmatched
        elif req.access_selector is not None:
            return 3
        rows = []
        for stamp in self._stamps(obis, lo, hi):
            t = enc_octets(cosem.encode_datetime(stamp.astimezone(MSK)))
            if obis == LOAD:
                rows.append(enc_struct(t, enc_u32(m.slot_wh(stamp - timedelta(seconds=PERIOD)))))
            else:
                rows.append(enc_struct(t, *[enc_u32(m.register_raw(REGISTERS[c], stamp)) for c in BILLING_COLUMNS]))
        return enc_array(rows)

    def _stamps(self, obis: bytes, lo: datetime | None, hi: datetime | None) -> list[datetime]:
        """Record times (UTC) the meter holds in [lo, hi], oldest first."""
        m = self.meter
        now = m.meter_time()
        oldest = now - PROFILE_DEPTH
        lo = max(lo or oldest, oldest)
        hi = min(hi or now, now)
        out = []
        if obis == LOAD:
            t = _slot_floor(lo)
            if t < lo:
                t += timedelta(seconds=PERIOD)
            while t <= hi:
                if t - timedelta(seconds=PERIOD) not in m.missing_slots or "missing_profile" not in m.faults:
                    out.append(t)
                t += timedelta(seconds=PERIOD)
            return out
        local = lo.astimezone(MSK)
        day = datetime(local.year, local.month, local.day, tzinfo=MSK)
        while day.astimezone(UTC) <= hi:
            if obis == DAILY or day.day == 1:
                if day.astimezone(UTC) >= lo:
                    out.append(day.astimezone(UTC))
            day = datetime.combine(day.date() + timedelta(days=1), datetime.min.time(), MSK)
        return out

    # SET and ACTION on the clock

    def _set(self, apdu: bytes) -> bytes:
        obis, attr = apdu[5:11], apdu[11]
        if obis != CLOCK or attr != 2 or self.client == hdlc.CLIENT_PUBLIC:
            return bytes((cosem.SET_RESPONSE, 1, apdu[2], 3))
        raw = cosem.decode_value(apdu[13:])
        t = cosem.decode_datetime(raw, MSK) if isinstance(raw, bytes) else None
        if t is None:
            return bytes((cosem.SET_RESPONSE, 1, apdu[2], 12))
        delta = (t - self.meter.meter_time()).total_seconds()
        self.meter.clock_offset_s += delta
        self.meter.clock_shifts.append(delta)
        return bytes((cosem.SET_RESPONSE, 1, apdu[2], 0))

    def _action(self, apdu: bytes) -> bytes:
        obis, method = apdu[5:11], apdu[11]
        if obis != CLOCK or method != 6 or self.client == hdlc.CLIENT_PUBLIC or apdu[12] != 1:
            return bytes((cosem.ACTION_RESPONSE, 1, apdu[2], 3, 0))
        seconds = cosem.decode_value(apdu[13:])
        if not isinstance(seconds, int) or abs(seconds) > 900:
            return bytes((cosem.ACTION_RESPONSE, 1, apdu[2], 250, 0))
        self.meter.clock_offset_s += seconds
        self.meter.clock_shifts.append(float(seconds))
        return bytes((cosem.ACTION_RESPONSE, 1, apdu[2], 0, 0))


def _slot_floor(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return t.replace(minute=(t.minute // 30) * 30, second=0, microsecond=0)


# --- HDLC on a pseudo-terminal ---------------------------------------------------------------


@dataclass
class _Link:
    """One meter's HDLC link state."""

    server: CosemServer
    connected: bool = False
    ns: int = 0
    nr: int = 0
    rx: bytearray = field(default_factory=bytearray)
    tx: list[bytes] = field(default_factory=list)  # segments still to send
    client: bytes = b""


class HdlcMeterLine:
    """Meters on one paced serial line; a thread answers frames addressed to each."""

    def __init__(self, meters: list[SimMeter], baudrate: int = 9600, max_info: int = 128,
                 turnaround_s: float = 0.0) -> None:
        self.line = PtyLine(baudrate)
        self.device = self.line.device
        self.meters = meters
        self.max_info = max_info
        self.turnaround_s = turnaround_s
        self.links: dict[int | None, _Link] = {m.physical_address: _Link(CosemServer(m)) for m in meters}
        self.reader = hdlc.FrameReader()
        self.frames_in = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlms-hdlc-sim", daemon=True)

    def start(self) -> HdlcMeterLine:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.line.close()

    def __enter__(self) -> HdlcMeterLine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        # byte by byte as each arrives at line rate: a meter answers on the closing flag,
        # it does not wait for the line to fall silent
        while not self._stop.is_set():
            data = self.line.read(1, 0.1)
            if not data:
                continue
            for raw in self.reader.feed(data):
                try:
                    frame = hdlc.decode_frame(raw)
                except hdlc.HdlcError:
                    continue  # a real meter ignores a frame it cannot check
                self.frames_in += 1
                self._frame(frame)

    def _find(self, dest: bytes) -> tuple[_Link | None, SimMeter | None]:
        logical, physical = hdlc.split_address(dest)
        if logical != 1:
            return None, None
        link = self.links.get(physical)
        if link is None and physical is None and len(self.links) == 1:
            link = next(iter(self.links.values()))
        return (link, link.server.meter) if link else (None, None)

    def _frame(self, frame: hdlc.Frame) -> None:
        link, meter = self._find(frame.dest)
        if link is None or meter is None or "silent" in meter.faults:
            return
        client_sap = frame.src[0] >> 1
        ctl = frame.control
        if ctl == hdlc.SNRM:
            link.connected, link.ns, link.nr = True, 0, 0
            link.rx.clear()
            link.tx.clear()
            link.server = CosemServer(meter)
            link.client = frame.src
            params = hdlc.encode_parameters(hdlc.LinkParameters(self.max_info, self.max_info, 1, 1))
            self._send(meter, frame.dest, frame.src, hdlc.UA, params)
            return
        if ctl == hdlc.DISC:
            was = link.connected
            link.connected = False
            self._send(meter, frame.dest, frame.src, hdlc.UA if was else hdlc.DM)
            return
        if not link.connected:
            self._send(meter, frame.dest, frame.src, hdlc.DM)
            return
        if frame.is_rr:
            if link.tx:
                self._send_segment(meter, link, frame.dest, frame.src)
            return
        if not frame.is_information:
            return
        link.nr = (frame.send_seq + 1) % 8
        link.rx += frame.info
        if frame.segmented:
            self._send(meter, frame.dest, frame.src, hdlc.rr_control(link.nr))
            return
        request = bytes(link.rx)
        link.rx.clear()
        if request[:3] != hdlc.LLC_REQUEST:
            return
        answer = link.server.handle(request[3:], client_sap)
        link.tx = hdlc.segments(hdlc.LLC_RESPONSE + answer, self.max_info)
        self._send_segment(meter, link, frame.dest, frame.src)

    def _send_segment(self, meter: SimMeter, link: _Link, own: bytes, client: bytes) -> None:
        part = link.tx.pop(0)
        self._send(meter, own, client, hdlc.i_control(link.ns, link.nr), part, segmented=bool(link.tx))
        link.ns = (link.ns + 1) % 8

    def _send(self, meter: SimMeter, own: bytes, client: bytes, control: int, info: bytes = b"",
              segmented: bool = False) -> None:
        raw = hdlc.encode_frame(client, own, control, info, segmented)
        if "bad_crc" in meter.faults:
            raw = raw[:-3] + bytes((raw[-3] ^ 0xFF,)) + raw[-2:]
        if "garbage" in meter.faults:
            raw = bytes(random.Random(len(raw)).randrange(256) for _ in range(len(raw))).replace(b"\x7e", b"\x55")
        if self.turnaround_s:
            time.sleep(self.turnaround_s)
        self.line.write(raw)


# --- the TCP wrapper -------------------------------------------------------------------------


class WrapperMeter:
    """One meter behind the IEC 62056-47 wrapper on a TCP port (logical device 1)."""

    def __init__(self, meter: SimMeter, host: str = "127.0.0.1", port: int = 0) -> None:
        self.meter = meter
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.host, self.port = str(self.server.server_address[0]), int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="dlms-wrapper-sim", daemon=True)

    def start(self) -> WrapperMeter:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> WrapperMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self, sock: socket.socket) -> None:
        app = CosemServer(self.meter)
        buf = b""
        sock.settimeout(30)
        try:
            while True:
                while len(buf) < cosem.WRAPPER_HEADER:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                source, dest, length = cosem.unwrap_header(buf[: cosem.WRAPPER_HEADER])
                while len(buf) < cosem.WRAPPER_HEADER + length:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                apdu = buf[cosem.WRAPPER_HEADER : cosem.WRAPPER_HEADER + length]
                buf = buf[cosem.WRAPPER_HEADER + length :]
                if "silent" in self.meter.faults or dest != 1:
                    continue
                answer = app.handle(apdu, source)
                out = cosem.wrap(dest, source, answer)
                if "garbage" in self.meter.faults:
                    out = b"\x55" * len(out)
                sock.sendall(out)
        except (OSError, cosem.CosemError):
            return


def main(argv: list[str] | None = None) -> int:
    """Serve simulated SPODES meters: `--hdlc N` on a pty (prints the device), `--wrapper` on TCP."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--hdlc", type=int, default=0, help="this many meters on one pty, physical addresses 17..")
    p.add_argument("--baudrate", type=int, default=9600)
    p.add_argument("--wrapper", action="store_true", help="one meter on the TCP wrapper")
    p.add_argument("--tcp-port", type=int, default=4059)
    p.add_argument("--password", default="12345678")
    args = p.parse_args(argv)
    servers: list[Any] = []
    if args.hdlc:
        line = HdlcMeterLine([SimMeter(17 + i, args.password, seed=i + 1, serial=f"SIM{i + 1:08d}")
                              for i in range(args.hdlc)], args.baudrate).start()
        servers.append(line)
        print(f"HDLC meters at physical addresses 17..{16 + args.hdlc} on {line.device}", flush=True)
    if args.wrapper:
        w = WrapperMeter(SimMeter(None, args.password), port=args.tcp_port).start()
        servers.append(w)
        print(f"wrapper meter on {w.host}:{w.port}", flush=True)
    if not servers:
        p.error("nothing to serve: give --hdlc N and/or --wrapper")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for s in servers:
            s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

