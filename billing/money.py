"""The one rounding rule for money: each bill line is rounded half-up to kopecks.

No statutory rule exists for household bills; the project's rule is that a
line's amount is kWh x rate rounded half-up to the kopeck, and a bill's total
is the plain sum of its (already rounded) lines, so the total printed on the
bill always equals what a customer adds up by hand. Money is never a float.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

KOPECK = Decimal("0.01")


def round_kopecks(amount: Decimal) -> Decimal:
    """Half-up to kopecks: 0.005 becomes 0.01, never banker's rounding."""
    return amount.quantize(KOPECK, rounding=ROUND_HALF_UP)


def line_amount(kwh: Decimal, rate: Decimal) -> Decimal:
    """The amount of one bill line, rounded once, here."""
    if not isinstance(kwh, Decimal) or not isinstance(rate, Decimal):
        raise TypeError("money is Decimal: kwh and rate must be Decimal, never float")
    return round_kopecks(kwh * rate)


def total(amounts: list[Decimal]) -> Decimal:
    """A bill's total: the sum of its rounded lines, never re-rounded from energy."""
    return sum(amounts, Decimal("0.00")).quantize(KOPECK)
