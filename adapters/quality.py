"""Quality flags carried on every reading, from the source to the bill.

A reading's flags are a set of these names. Source flags come from the
adapter (what happened on the wire); validation flags are added by the
collector. Names are stored as text in the database, so they are part of the
data contract: add new ones, never rename.
"""

from __future__ import annotations

# --- from the source (adapters) ---
RETRIED = "retried"  # the value came on a retry after a timeout or error
CLOCK_SKEW = "clock_skew"  # the meter's clock differs from ours beyond tolerance
METER_CLOCK = "meter_clock"  # ts is the meter's own clock, not the poll time
LATE = "late"  # read after its scheduled slot (retry within the interval)
MANUAL = "manual"  # entered by a person (manual-metering subscribers)
IMPORTED = "imported"  # loaded from a file by `amr ingest`
SPOOLED = "spooled"  # went through a gateway's store-and-forward spool
FROM_PROFILE = "from_profile"  # built from the meter's own load profile (a gap read back): measured, not estimated

# --- from validation (collector.rules.vee) ---
ROLLOVER = "rollover"  # a decrease read as a register wrap at its maximum
RESET = "reset"  # a decrease read as a counter reset / meter replacement
GLITCH = "glitch"  # a transient spike or dip, ignored without re-basing
SUSPECT = "suspect"  # implies more than the meter's maximum power
ESTIMATED = "estimated"  # placement in time estimated (gap or zone crossing)

SOURCE_FLAGS = frozenset({RETRIED, CLOCK_SKEW, METER_CLOCK, LATE, MANUAL, IMPORTED, SPOOLED, FROM_PROFILE})
VALIDATION_FLAGS = frozenset({ROLLOVER, RESET, GLITCH, SUSPECT, ESTIMATED})
ALL = SOURCE_FLAGS | VALIDATION_FLAGS


def check(flag: str) -> str:
    """Refuse an unknown flag early: a typo here would be a silent data bug."""
    if flag not in ALL:
        raise ValueError(f"unknown quality flag {flag!r}; known: {sorted(ALL)}")
    return flag
