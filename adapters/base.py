"""What the scheduler needs from a polling adapter, whatever its protocol, and what an
adapter needs from the rest.

A poll either returns readings or raises `PollError` with a short outcome
word (for metrics labels) and a message that names the meter, the bus and the
reason (for the operator's log).

Adapters import nothing above them: their settings and their meters come in
as values. The protocols below say which attributes those values must have,
so the inventory's `Meter` and `amr.settings.Settings` satisfy them by their
shape, and a test or a simulation can hand in any object of the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from adapters.reading import Reading

# outcome words used as metric labels; keep the set small and fixed
OUTCOMES = ("ok", "timeout", "deadline", "crc", "exception", "decode", "refused", "garbage", "clock")


class PollError(Exception):
    """A poll that gave no readings: the outcome word, and a message for the operator.

    `raw` holds the bytes of an answer that came but is not a value (a
    register block of the wrong length, words that do not decode), and
    `source` where they came from, so the refusal can be kept in
    `rejected_reading` with its bytes; both are None when nothing usable
    arrived (a timeout, a refused connection).
    """

    def __init__(self, outcome: str, message: str, raw: bytes | None = None, source: str | None = None):
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown poll outcome {outcome!r}")
        self.outcome = outcome
        self.raw = raw
        self.source = source
        super().__init__(message)


class AdapterSettings(Protocol):
    """The settings adapters read (`amr.settings.Settings` has them)."""

    @property
    def clock_skew_tolerance_s(self) -> float:
        """A meter clock further than this from ours is flagged `clock_skew`."""
        ...

    @property
    def timezone(self) -> str:
        """The local time zone a meter's clock shows (IEC 62056-21 date and time)."""
        ...

    @property
    def iec_message_deadline_s(self) -> float:
        """The ceiling of every IEC 62056-21 message's deadline."""
        ...


class PolledMeter(Protocol):
    """What every polling adapter reads of a meter (the inventory's `Meter` has it).

    Read-only properties, so a frozen record or a plain object fits alike.
    """

    @property
    def id(self) -> str: ...

    @property
    def adapter(self) -> str:
        """modbus_tcp, modbus_rtu or iec62056."""
        ...

    @property
    def bus_name(self) -> str:
        """The bus the meter is on, for messages, metrics and the scheduler's turns."""
        ...

    @property
    def port(self) -> int | str | None:
        """A TCP port, or the serial device path."""
        ...

    @property
    def baudrate(self) -> int | None: ...

    @property
    def timeout(self) -> float:
        """Seconds to wait for an answer (IEC 62056-21: between two bytes)."""
        ...

    @property
    def registers(self) -> Sequence[str]:
        """The OBIS registers to read."""
        ...


class ModbusMeter(PolledMeter, Protocol):
    """What `adapters.modbus` reads of a meter besides the common keys."""

    @property
    def preset(self) -> str | None:
        """The register map: a preset name or a file."""
        ...

    @property
    def host(self) -> str | None: ...

    @property
    def unit(self) -> int | None: ...

    @property
    def parity(self) -> str | None:
        """N, E or O; None is N."""
        ...

    @property
    def pause(self) -> float:
        """Seconds of quiet after each request on a shared bus."""
        ...

    @property
    def max_request(self) -> int:
        """The most registers one request may ask for."""
        ...


class IecMeter(PolledMeter, Protocol):
    """What `adapters.iec62056` reads of a meter besides the common keys."""

    @property
    def address(self) -> str | None:
        """The device address on a multi-drop line."""
        ...

    @property
    def dialect(self) -> str:
        """A key of `adapters.iec62056.DIALECTS`."""
        ...

    @property
    def password(self) -> str | None:
        """The programming-mode password, when the dialect asks for one."""
        ...


class MercuryMeter(PolledMeter, Protocol):
    """What `adapters.mercury_adapter` reads of a meter besides the common keys."""

    @property
    def address(self) -> str | None:
        """v2: 1..240 (0 = broadcast); v1: the address from the serial number."""
        ...

    @property
    def password(self) -> str | None: ...

    @property
    def password_encoding(self) -> str | None:
        """digits (each digit a byte 0..9) or ascii."""
        ...

    @property
    def access_level(self) -> int | None: ...

    @property
    def host(self) -> str | None:
        """A transparent RS-485-to-Ethernet converter's host, with `tcp_port`."""
        ...

    @property
    def tcp_port(self) -> int | None: ...


class AnyMeter(ModbusMeter, IecMeter, MercuryMeter, Protocol):
    """A meter as the scheduler hands it to an adapter: the keys of every protocol."""


class PollingAdapter(Protocol):
    """One protocol's reader; the scheduler serialises calls per bus."""

    async def read(self, meter: AnyMeter) -> list[Reading]:
        """Read the meter's configured registers once."""
        ...

    async def close(self) -> None:
        """Release ports and sockets."""
        ...


@dataclass(frozen=True)
class ProfileSlot:
    """One interval of a meter's own load profile, as the meter stored it.

    A profile gives the energy of each slot, not a cumulative value: the
    collector turns a run of slots into register values at each boundary by
    anchoring them to a reading just taken (see the gateway's back-fill), so
    a gap's energy gets its exact place in time instead of an estimated one.
    `wh` is None when the meter marks the slot invalid (power failure, clock
    set, record missing): that slot is left to estimation, never read as 0.
    """

    start: datetime  # aware UTC
    end: datetime  # aware UTC, start < end
    register: str  # OBIS, e.g. "1.8.0"
    wh: int | None  # energy in the slot in Wh; None = the meter marks the slot invalid


class ProfileMeter(Protocol):
    """An adapter that can read a meter's load profile (its memory of past slots).

    The gateway checks for this by shape when a meter answers again after a
    gap, so an adapter opts in just by having the method. `limit` caps the
    slots one call returns, so a long outage cannot hold the bus for one
    meter; slots come oldest first, only those with `start` in [start, end).
    """

    async def read_profile(self, meter: AnyMeter, start: datetime, end: datetime, limit: int) -> list[ProfileSlot]:
        """Read the profile slots starting in [start, end), oldest first, at most `limit`."""
        ...


class ClockSettable(Protocol):
    """An adapter that can move a meter's clock (an opt-in correction policy uses it).

    The gateway decides whether and how far (within the protocol's daily limit,
    off unless the inventory asks); the adapter only carries out the shift.
    """

    async def correct_clock(self, meter: AnyMeter, delta_s: float) -> None:
        """Move the meter's clock by `delta_s` seconds (positive = forward); raise PollError on failure."""
        ...
