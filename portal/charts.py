"""Consumption charts drawn on the server as SVG: stacked bars per tariff zone, no JavaScript.

The page embeds the SVG inline, so it shows in any browser, prints, and is
read by a screen reader through its <title> and <desc> (the desc says the
totals in words; the table under the chart has every figure). The axis is
scaled to a "nice" step (1, 2 or 5 times a power of ten) so its labels are
round numbers.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from portal.formatting import CHART_ZONES, number, zone

COLOURS = {"night": "#3b5b92", "half_peak": "#7fb3d5", "peak": "#e07b39"}
WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 64


@dataclass(frozen=True)
class Bar:
    """One bar: its axis label and its energy per zone (kWh)."""

    label: str
    zones: Mapping[str, Decimal]

    @property
    def total(self) -> Decimal:
        return sum((Decimal(self.zones.get(z, 0)) for z in CHART_ZONES), Decimal(0))


def nice_step(top: Decimal, ticks: int = 5) -> Decimal:
    """A round step (1, 2, 5 x 10^n) so that `ticks` of them reach at least `top`."""
    if top <= 0:
        return Decimal(1)
    raw = top / ticks
    exp = raw.adjusted()
    for m in (1, 2, 5, 10):
        step = Decimal(m).scaleb(exp)
        if step >= raw:
            return step
    return Decimal(10).scaleb(exp)  # pragma: no cover (10 always passes)


def stacked_bars(bars: Sequence[Bar], *, chart_id: str, title: str, desc: str, unit: str = "кВт·ч") -> str:
    """The SVG of `bars`, each stacked night / half-peak / peak from the bottom, with axes and a legend."""
    e = html.escape
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = max((b.total for b in bars), default=Decimal(0))
    step = nice_step(top)
    ticks = max(int((top / step).to_integral_value(rounding="ROUND_CEILING")), 1)
    ymax = step * ticks
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{e(chart_id)}" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" aria-labelledby="{e(chart_id)}-title {e(chart_id)}-desc">',
        f'<title id="{e(chart_id)}-title">{e(title)}</title>',
        f'<desc id="{e(chart_id)}-desc">{e(desc)}</desc>',
        '<g class="axis" font-family="sans-serif" font-size="11" fill="#333">',
    ]
    places = 0 if step >= 1 else 1
    for i in range(ticks + 1):
        v = step * i
        y = TOP + plot_h - float(v / ymax) * plot_h
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{e(number(v, places))}</text>')
    parts.append(f'<text x="12" y="{TOP + plot_h / 2:.0f}" transform="rotate(-90 12 {TOP + plot_h / 2:.0f})" '
                 f'text-anchor="middle">{e(unit)}</text>')
    n = max(len(bars), 1)
    slot = plot_w / n
    bar_w = max(slot * 0.7, 1.0)
    every = max(1, -(-n // 16))  # at most ~16 labels under the axis
    for i, b in enumerate(bars):
        x = LEFT + i * slot + (slot - bar_w) / 2
        base = float(TOP + plot_h)
        for z in CHART_ZONES:
            v = Decimal(b.zones.get(z, 0))
            if v <= 0:
                continue
            h = float(v / ymax) * plot_h
            base -= h
            parts.append(f'<rect class="zone-{z}" x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{COLOURS[z]}"><title>{e(b.label)}, {e(zone(z))}: '
                         f'{e(number(v))} {e(unit)}</title></rect>')
        if i % every == 0:
            cx = LEFT + i * slot + slot / 2
            parts.append(f'<text x="{cx:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{e(b.label)}</text>')
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#333"/>')
    lx = LEFT
    for z in CHART_ZONES:
        parts.append(f'<rect x="{lx}" y="{HEIGHT - 22}" width="12" height="12" fill="{COLOURS[z]}"/>'
                     f'<text x="{lx + 16}" y="{HEIGHT - 12}">{e(zone(z))}</text>')
        lx += 100
    parts.append("</g></svg>")
    return "\n".join(parts)


def describe(bars: Sequence[Bar], what: str) -> str:
    """The chart's <desc>: how many bars, the total per zone, the largest bar."""
    if not bars:
        return f"{what}: данных о потреблении нет."
    sums = {z: sum((Decimal(b.zones.get(z, 0)) for b in bars), Decimal(0)) for z in CHART_ZONES}
    biggest = max(bars, key=lambda b: b.total)
    zones = ", ".join(f"{zone(z)} {number(v)} кВт·ч" for z, v in sums.items())
    return (f"{what}: {len(bars)} столбцов, всего {number(sum(sums.values(), Decimal(0)))} кВт·ч ({zones}); "
            f"больше всего — {biggest.label}, {number(biggest.total)} кВт·ч.")
