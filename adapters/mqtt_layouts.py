"""Topic layouts: how a device family's topic pattern with a configurable prefix becomes matchers.

People configure their devices' topics: Tasmota's FullTopic (`%prefix%` and
`%topic%` in either order, with extra levels), Zigbee2MQTT's `base_topic`,
Shelly's topic prefix (doubled prefixes happen), ESPHome's `topic_prefix`.
A family in adapters/schemas/mqtt-devices.toml names its topic as a pattern
and its default prefix; the inventory may give another prefix or a whole
pattern. This module is the one place that turns a pattern into

- a strict matcher (the prefix as configured, the other placeholders as groups),
- a loose matcher (`amr mqtt decode --format F`, `amr mqtt listen`: any topic
  that ends like the pattern, the prefix being whatever comes before),
- the MQTT topic filter a collector subscribes to.

Pattern syntax: levels separated by `/`; `{prefix}` stands for the prefix (one
or more levels; `+` in a prefix is any one level); `{device}` one level, the
device id; `{channel}` a number; `{field}` one of the format's field names;
any other `{name}` a part of a level; `+` any one level. Tasmota's own
notation is accepted too: `%prefix%` is `{prefix}`, `%topic%` is `{device}`,
`%hostname%` and `%id%` are any one level; a pattern that ends with `/` (as a
FullTopic does) gets the family's last level (`SENSOR`) appended.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TASMOTA = {"%prefix%": "{prefix}", "%topic%": "{device}", "%hostname%": "+", "%id%": "+"}
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class LayoutError(ValueError):
    """A topic pattern that cannot be used; the message says which part and why."""


def normalize(pattern: str, leaf: str | None = None) -> str:
    """The pattern in `{name}` notation, with the family's leaf level after a trailing `/`."""
    text = pattern.strip()
    for tas, ours in _TASMOTA.items():
        text = text.replace(tas, ours)
    if text.endswith("/") and leaf:
        text += leaf
    text = text.strip("/") if not text.startswith("/") else text
    if not text:
        raise LayoutError(f"topic pattern {pattern!r} is empty")
    if "#" in text:
        raise LayoutError(f"topic pattern {pattern!r}: '#' is not allowed; name each level")
    return text


def _check_prefix(prefix: str) -> str:
    p = prefix.strip().strip("/")
    if not p:
        raise LayoutError("topic_prefix is empty")
    if "#" in p or "{" in p or "%" in p:
        raise LayoutError(f"topic_prefix {prefix!r}: only topic levels and '+' are allowed")
    return p


def _level_regex(level: str, fields: Iterable[str], loose_prefix: bool, prefix: str | None) -> str:
    if level == "+":
        return "[^/]+"
    out: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(level):
        out.append(re.escape(level[pos:m.start()]))
        name = m.group(1)
        if name == "prefix":
            if loose_prefix or prefix is None:
                out.append("(?P<prefix>.+)")
            else:
                lv = "/".join("[^/]+" if p == "+" else re.escape(p) for p in prefix.split("/"))
                out.append(f"(?P<prefix>{lv})")
        elif name == "channel":
            out.append("(?P<channel>[0-9]+)")
        elif name == "field":
            alts = "|".join(re.escape(f) for f in fields)
            if not alts:
                raise LayoutError("pattern uses {field} but the format names no fields")
            out.append(f"(?P<field>{alts})")
        else:
            out.append(f"(?P<{name}>[^/:]+)")
        pos = m.end()
    out.append(re.escape(level[pos:]))
    return "".join(out)


def compile_pattern(pattern: str, prefix: str | None, fields: Iterable[str] = (), *, loose: bool = False,
                    kinds: Iterable[str] = ()) -> re.Pattern[str]:
    """A regex for a normalized pattern: strict (the prefix as given) or loose (any topic ending like it).

    `kinds` restricts a `{kind}` placeholder to those words (Shelly's components).
    """
    fields = tuple(fields)
    levels = pattern.split("/")
    names = _PLACEHOLDER.findall(pattern)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LayoutError(f"topic pattern {pattern!r}: {{{sorted(dup)[0]}}} appears twice")
    parts = [_level_regex(lv, fields, loose, prefix) for lv in levels]
    body = "/".join(parts)
    kinds = tuple(kinds)
    if kinds:
        body = body.replace("(?P<kind>[^/:]+)", "(?P<kind>" + "|".join(re.escape(k) for k in kinds) + ")")
    if loose and "{prefix}" not in pattern:
        body = "(?:.+/)?" + body  # the topic ends like the pattern: anything may come before
    try:
        return re.compile(f"^{body}$")
    except re.error as exc:
        raise LayoutError(f"topic pattern {pattern!r}: {exc}") from None


def topic_filter(pattern: str, prefix: str | None, fields: Iterable[str] = ()) -> list[str]:
    """The MQTT subscription filters that carry a pattern's topics (one per `{field}` value)."""
    if "{prefix}" in pattern and prefix is None:
        raise LayoutError(f"topic pattern {pattern!r} needs a prefix to subscribe to")
    levels: list[str] = []
    for level in pattern.split("/"):
        if level == "{prefix}":
            levels.append(_check_prefix(prefix or ""))
        elif level == "{field}":
            levels.append("{field}")
        elif "{" in level:
            levels.append("+")
        else:
            levels.append(level)
    text = "/".join(levels)
    if "{field}" in text:
        return [text.replace("{field}", f) for f in fields]
    return [text]


def check_prefix(prefix: str) -> str:
    """A topic prefix as configured (levels, '+' allowed), or LayoutError naming the problem."""
    return _check_prefix(prefix)
