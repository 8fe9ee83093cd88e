"""The one record every adapter produces and the collector consumes.

Cumulative registers are the truth: a `Reading` is a meter's counter at an
instant, never an energy delta. Deltas are derived later, in one place
(`collector.rules.intervals`), so that a late or repeated reading can always be
reconciled with the ones around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from adapters import quality


class Reading(NamedTuple):
    """One value of one register of one meter at one instant.

    `ts` must be timezone-aware; the collector converts it to UTC.
    `quality` holds flags from `adapters.quality`; validation adds flags and
    never changes `value`. Immutable; a tuple rather than a frozen dataclass
    because every adapter makes one per value read and a tuple is built in
    half the time.
    """

    meter_id: str
    register: str
    ts: datetime
    value: Decimal
    quality: frozenset[str] = frozenset()
    source: str = ""

    def flagged(self, *flags: str) -> Reading:
        """Return a copy with more quality flags (the raw value is untouched)."""
        for flag in flags:
            quality.check(flag)
        return self._replace(quality=self.quality | frozenset(flags))


# Every reason code a refusal may carry, for the amr_rejects_total{code} label. A code
# not in this set (a forwarded reject from another version, a typo) is still stored with
# its own text in rejected_reading, but is counted under "other": labels come from this
# fixed set only, so no input can create metric series.
REJECT_CODES = frozenset({
    # validation (collector.rules.vee) and the store
    "bad_meter_id", "unknown_meter", "bad_register", "unknown_register", "not_numeric", "not_finite", "negative",
    "above_rollover", "bad_ts", "naive_ts", "future_ts", "before_installation", "after_removal",
    "implausible_ts", "beyond_retention", "conflict", "store_error", "invalid",
    # payload decoders (adapters.mqtt_formats, collector.mqtt.decoding)
    "malformed", "too_deep", "too_large", "type", "ts", "schema", "no_energy", "unknown_topic",
    "unknown_device", "decode_error", "spool_damaged", "unit",
    # file imports (collector.ingest.importfile)
    "parse_error", "encoding", "too_long", "truncated", "implausible_value",
    # polls (adapters.base.OUTCOMES)
    "timeout", "deadline", "crc", "exception", "decode", "refused", "garbage", "clock",
    "other",
})


class Refusal(tuple[str, str]):
    """Why a value or a reading must not be stored: (code, reason).

    The code is a short fixed word from `REJECT_CODES` for metrics; the reason
    names the meter, the field and what is wrong, for a person.
    """

    __slots__ = ()

    def __new__(cls, code: str, reason: str) -> Refusal:
        return super().__new__(cls, (code, reason))

    @property
    def code(self) -> str:
        return self[0]

    @property
    def reason(self) -> str:
        return self[1]


def check_value(value: object, who: str) -> Refusal | None:
    """The value rules alone: a decimal number, finite, not negative; None when it passes.

    Kept beside `Reading` because decoders apply them before any meter is
    known (so a refusal names the field of the payload), and validation
    (`collector.rules.vee`) applies the same ones to every reading: one
    definition, the same codes and reasons wherever a value is refused.
    `who` names the value's owner or field in the reason.
    """
    if not isinstance(value, Decimal):
        return Refusal("not_numeric", f"{who}: value {value!r} is not a decimal number")
    if not value.is_finite():
        return Refusal("not_finite", f"{who}: value {value} is not a finite number")
    if value < 0:
        return Refusal("negative", f"{who}: value {value} is negative; registers count up from 0")
    return None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input that could not become a `Reading`, kept with its raw bytes.

    Adapters and decoders hand these to the same ingestion entry point as
    readings, so that every refusal lands in `rejected_reading` with a reason
    that names the field: nothing is silently dropped.
    """

    source: str
    raw: bytes
    reason: str  # for a person: names the field and what is wrong with it
    code: str = "invalid"  # for machines and metric labels: a short fixed word
    meter_id: str | None = None
    register: str | None = None
    ts: datetime | None = None
