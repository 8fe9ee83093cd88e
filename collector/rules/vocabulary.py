"""The names of tariff zones, plans, consumer categories and areas, spelled once.

The zone calendar (collector.rules.zones) stores energy under zone names, and
billing (billing.tariffs, billing.engine, billing.api) prices and shows it under
the same names; a name misspelt in one of them would silently bill nothing for
that zone. So they are all spelled here, and only here; it lives in
collector.rules because billing may import the collector and never the other way
round. The values are what the database, the catalogues (TOML) and the API
carry, so they never change; SQL text and data files spell them literally.
"""

from __future__ import annotations

from typing import Final

# --- zones --------------------------------------------------------------------------
# stored zones: what the zone calendar assigns each instant to, and daily_zone_usage keeps
NIGHT: Final = "night"
PEAK: Final = "peak"
HALF_PEAK: Final = "half_peak"
STORED_ZONES: Final[tuple[str, ...]] = (NIGHT, PEAK, HALF_PEAK)
# zones only a plan has, made of stored zones (see FOLD)
DAY: Final = "day"  # peak and half-peak together: the day zone of a two-zone plan
ALL: Final = "all"  # the whole day: the one zone of a single-rate plan

# --- plans --------------------------------------------------------------------------
SINGLE: Final = "single"
TWO_ZONE: Final = "two_zone"
THREE_ZONE: Final = "three_zone"
PLANS: Final[tuple[str, ...]] = (SINGLE, TWO_ZONE, THREE_ZONE)

# the zones of each plan, in the order a bill lists them
PLAN_ZONES: Final[dict[str, tuple[str, ...]]] = {
    SINGLE: (ALL,),
    TWO_ZONE: (DAY, NIGHT),
    THREE_ZONE: (PEAK, HALF_PEAK, NIGHT),
}
# which plan zone each stored zone counts in, per plan
FOLD: Final[dict[str, dict[str, str]]] = {
    SINGLE: {NIGHT: ALL, PEAK: ALL, HALF_PEAK: ALL},
    TWO_ZONE: {NIGHT: NIGHT, PEAK: DAY, HALF_PEAK: DAY},
    THREE_ZONE: {NIGHT: NIGHT, PEAK: PEAK, HALF_PEAK: HALF_PEAK},
}

# --- consumer categories and areas --------------------------------------------------
GAS_STOVE: Final = "gas_stove"
ELECTRIC_STOVE: Final = "electric_stove"
RURAL: Final = "rural"  # the category of rural homes, whatever their stove
CATEGORIES: Final[tuple[str, ...]] = (GAS_STOVE, ELECTRIC_STOVE, RURAL)

URBAN_AREA: Final = "urban"
RURAL_AREA: Final = "rural"
AREAS: Final[tuple[str, ...]] = (URBAN_AREA, RURAL_AREA)
