"""The simulated serial line takes the time a real UART would, in both directions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import serial

from simulators.serial_line import PtyLine, bits_per_char


def _on_time(elapsed: float, expected: float) -> bool:
    """Never faster than the line; late by at most 10% plus scheduling noise."""
    return expected * 0.98 - 0.001 <= elapsed <= expected * 1.1 + 0.02


def _paced(measure: Callable[[], float], expected: float, tries: int = 4) -> None:
    """Assert one transfer is on time, in the best of a few tries.

    Every try must be no faster than the line (that is the property: a simulator that delivers early
    would hide timeouts a real UART causes); a busy machine only ever makes a transfer later, so the
    upper bound holds for the best try, not each one.
    """
    seen = []
    for _ in range(tries):
        elapsed = measure()
        seen.append(elapsed)
        assert elapsed >= expected * 0.98 - 0.001, (elapsed, expected)
        if _on_time(elapsed, expected):
            return
    raise AssertionError(f"never on time: {seen} for {expected}")


def test_bits_per_char() -> None:
    assert bits_per_char(8, "N", 1) == 10
    assert bits_per_char(7, "E", 1) == 10
    assert bits_per_char(8, "E", 2) == 12
    with pytest.raises(ValueError):
        bits_per_char(8, "X", 1)


@pytest.mark.parametrize("baud,n", [(9600, 100), (19200, 200), (1200, 12)])
def test_write_takes_line_time(baud: int, n: int) -> None:
    with PtyLine(baudrate=baud) as line, serial.Serial(line.device, baud, timeout=2) as client:
        payload = bytes(range(n))

        def measure() -> float:
            t0 = time.perf_counter()
            threading.Thread(target=line.write, args=(payload,), daemon=True).start()
            got = client.read(n)
            elapsed = time.perf_counter() - t0
            assert got == payload
            return elapsed

        _paced(measure, n * 10 / baud)


def test_first_byte_not_before_one_char_time() -> None:
    with PtyLine(baudrate=300) as line, serial.Serial(line.device, 300, timeout=2) as client:

        def measure() -> float:
            t0 = time.perf_counter()
            threading.Thread(target=line.write, args=(b"AB",), daemon=True).start()
            assert client.read(1) == b"A"
            elapsed = time.perf_counter() - t0
            assert client.read(1) == b"B"
            return elapsed

        _paced(measure, 10 / 300)


def test_request_cannot_be_read_before_it_arrived() -> None:
    with PtyLine(baudrate=9600) as line, serial.Serial(line.device, 9600, timeout=2) as client:
        request = b"x" * 96  # 0.1 s at 9600 8N1

        def measure() -> float:
            t0 = time.perf_counter()
            client.write(request)
            got = line.read(96, timeout=2)
            elapsed = time.perf_counter() - t0
            assert got == request
            return elapsed

        _paced(measure, 0.1)


def test_read_returns_partial_on_timeout() -> None:
    with PtyLine(baudrate=9600) as line, serial.Serial(line.device, 9600, timeout=2) as client:
        client.write(b"abc")
        t0 = time.perf_counter()
        assert line.read(10, timeout=0.05) == b"abc"
        assert 0.045 < time.perf_counter() - t0 < 0.2


def test_read_until_silence_splits_frames_on_gap() -> None:
    with PtyLine(baudrate=9600) as line, serial.Serial(line.device, 9600, timeout=2) as client:
        gap = 3.5 * line.char_time

        def measure() -> float:
            client.write(b"first")
            t0 = time.perf_counter()
            frame = line.read_until_silence(gap, timeout=1)
            elapsed = time.perf_counter() - t0
            assert frame == b"first"
            return elapsed

        _paced(measure, 5 * line.char_time + gap)
        assert line.read_until_silence(gap, timeout=0.02) == b""


def test_back_to_back_writes_queue_on_the_line() -> None:
    """Two writes sent at once arrive one after the other, not together."""
    with PtyLine(baudrate=9600) as line, serial.Serial(line.device, 9600, timeout=2) as client:

        def measure() -> float:
            t0 = time.perf_counter()
            client.write(b"a" * 48)
            client.write(b"b" * 48)
            got = line.read(96, timeout=2)
            elapsed = time.perf_counter() - t0
            assert got == b"a" * 48 + b"b" * 48
            return elapsed

        _paced(measure, 0.1)


def test_set_baudrate_changes_pace() -> None:
    with PtyLine(baudrate=300) as line, serial.Serial(line.device, 300, timeout=2) as client:
        line.set_baudrate(9600)

        def measure() -> float:
            t0 = time.perf_counter()
            threading.Thread(target=line.write, args=(b"z" * 96,), daemon=True).start()
            assert client.read(96) == b"z" * 96
            return time.perf_counter() - t0

        _paced(measure, 0.1)
