"""What the scheduler needs from a polling adapter, whatever its protocol.

A poll either returns readings or raises `PollError` with a short outcome
word (for metrics labels) and a message that names the meter, the bus and the
reason (for the operator's log).
"""

from __future__ import annotations

from typing import Protocol

from adapters.reading import Reading

# outcome words used as metric labels; keep the set small and fixed
OUTCOMES = ("ok", "timeout", "deadline", "crc", "exception", "decode", "refused", "garbage", "clock")


class PollError(Exception):
    def __init__(self, outcome: str, message: str):
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown poll outcome {outcome!r}")
        self.outcome = outcome
        super().__init__(message)


class PollingAdapter(Protocol):
    """One protocol's reader; the scheduler serialises calls per bus."""

    async def read(self, meter: object) -> list[Reading]:
        """Read the meter's configured registers once (meter is an inventory Meter)."""
        ...

    async def close(self) -> None:
        """Release ports and sockets."""
        ...
