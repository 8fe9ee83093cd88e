"""A serial line on a pseudo-terminal pair, with the timing of a real UART.

A pty delivers bytes instantly, which would let a simulated meter answer
faster than any real one and make timeouts, inter-frame gaps and throughput
benchmarks meaningless. `PtyLine` paces both directions at the configured
line rate: a character takes bits_per_char / baudrate seconds, where
bits_per_char = 1 start bit + data bits + parity bit (if any) + stop bits.

The client (an adapter under test) opens `.device` with pyserial or pymodbus
like any serial port; the simulator uses `read`, `read_until_silence` and
`write` on the other side. Received bytes are only handed to the simulator
once they would have finished arriving on the wire, so a request of n bytes
cannot be answered before n character times have passed since it was sent.
"""

from __future__ import annotations

import os
import select
import time
import tty

_PARITY_BITS = {"N": 0, "E": 1, "O": 1, "M": 1, "S": 1}


def bits_per_char(bytesize: int = 8, parity: str = "N", stopbits: float = 1) -> float:
    """Bits on the wire for one character (start + data + parity + stop)."""
    if parity not in _PARITY_BITS:
        raise ValueError(f"parity must be one of {sorted(_PARITY_BITS)}, not {parity!r}")
    if bytesize not in (5, 6, 7, 8):
        raise ValueError(f"bytesize must be 5..8, not {bytesize!r}")
    if stopbits not in (1, 1.5, 2):
        raise ValueError(f"stopbits must be 1, 1.5 or 2, not {stopbits!r}")
    return 1 + bytesize + _PARITY_BITS[parity] + stopbits


class PtyLine:
    """The simulator's end of a paced serial line; `.device` is the client's end."""

    def __init__(
        self, baudrate: int = 9600, bytesize: int = 8, parity: str = "N", stopbits: float = 1
    ) -> None:
        self.bits_per_char = bits_per_char(bytesize, parity, stopbits)
        self.baudrate = 0
        self.char_time = 0.0
        self.set_baudrate(baudrate)
        self._master, self._slave = os.openpty()
        # raw mode: no echo, no line discipline, 8-bit clean, until the client sets its own
        tty.setraw(self._slave)
        tty.setraw(self._master)
        self.device: str = os.ttyname(self._slave)
        self._pending = bytearray()  # received bytes not yet handed to the simulator
        self._arrivals: list[float] = []  # when each pending byte has fully arrived
        self._rx_free = 0.0  # when the receive line is next idle
        self._closed = False

    # --- timing -----------------------------------------------------------

    def set_baudrate(self, baudrate: int) -> None:
        """Change the line rate (IEC 62056-21 baud switch); applies to the next byte."""
        if baudrate <= 0:
            raise ValueError(f"baudrate must be positive, not {baudrate!r}")
        self.baudrate = baudrate
        self.char_time = self.bits_per_char / baudrate

    def line_time(self, nbytes: int) -> float:
        """Seconds that nbytes take on the wire at the current rate."""
        return nbytes * self.char_time

    # --- receiving (client -> simulator) ----------------------------------

    def _pull(self, wait: float) -> None:
        """Move bytes from the pty into the pending buffer, stamping their arrival."""
        ready, _, _ = select.select([self._master], [], [], max(wait, 0.0))
        if not ready:
            return
        try:
            data = os.read(self._master, 4096)
        except OSError:  # EIO: no client has the device open
            if wait > 0:
                time.sleep(min(wait, 0.01))
            return
        now = time.perf_counter()
        t = max(now, self._rx_free)
        for _ in data:
            t += self.char_time
            self._arrivals.append(t)
        self._rx_free = t
        self._pending += data

    def _take(self, n: int) -> bytes:
        out = bytes(self._pending[:n])
        del self._pending[:n]
        del self._arrivals[:n]
        return out

    def read(self, n: int, timeout: float) -> bytes:
        """Up to n bytes, returned once they have arrived at line rate or timeout is over."""
        deadline = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            if len(self._pending) >= n:
                if self._arrivals[n - 1] <= now:
                    return self._take(n)
                if now < deadline:  # the bytes are on the wire: wait for the last one
                    time.sleep(min(self._arrivals[n - 1], deadline) - now)
                    continue
            if now >= deadline:
                return self._take(sum(1 for a in self._arrivals[:n] if a <= now))
            self._pull(deadline - now)

    def read_until_silence(self, gap_s: float, timeout: float) -> bytes:
        """A frame: bytes until the line has been quiet for gap_s after the last one.

        Returns b"" when nothing arrived within timeout; a frame that began in
        time is read to its end even if that runs past the timeout by less
        than the frame itself.
        """
        deadline = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            if self._pending:
                quiet_at = self._arrivals[-1] + gap_s
                if now >= quiet_at:
                    self._pull(0)  # a last look: more bytes may have come meanwhile
                    if self._arrivals[-1] + gap_s <= time.perf_counter():
                        return self._take(len(self._pending))
                    continue
                self._pull(quiet_at - now)
            else:
                if now >= deadline:
                    return b""
                self._pull(deadline - now)

    def reset_input(self) -> None:
        """Drop everything received so far (a meter that restarts its receiver)."""
        while True:
            ready, _, _ = select.select([self._master], [], [], 0)
            if not ready:
                break
            try:
                os.read(self._master, 4096)
            except OSError:
                break
        self._pending.clear()
        self._arrivals.clear()

    # --- sending (simulator -> client) ------------------------------------

    def write(self, data: bytes) -> None:
        """Send data at line rate; returns when the last byte has reached the client."""
        t0 = time.perf_counter()
        sent = 0
        n = len(data)
        ct = self.char_time
        while sent < n:
            now = time.perf_counter()
            due = min(n, int((now - t0) / ct))  # bytes whose last bit has been sent
            if due > sent:
                self._write_all(data[sent:due])
                sent = due
            if sent < n:
                next_at = t0 + (sent + 1) * ct
                time.sleep(max(next_at - time.perf_counter(), 0.0))

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            _, ready, _ = select.select([], [self._master], [], 1.0)
            if ready:
                k = os.write(self._master, view)
                view = view[k:]

    # --- lifetime ---------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> PtyLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
