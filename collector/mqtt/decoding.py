"""What the collector makes of one MQTT message: its payload family, outcome and items.

Used where a message is stored (the collector's own thread, or an ingestion
worker process), so it travels to worker processes: it holds only the
device map and the time zone, both picklable.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import NamedTuple

from adapters import mqtt_formats as fmt
from adapters.reading import Reading, Rejected
from adapters.wire import MAX_RAW_KEPT

log = logging.getLogger("amr.mqtt")


class Message(NamedTuple):
    """One MQTT message as received, before anything is made of it."""

    topic: str
    payload: bytes
    received: datetime


class Decoded(NamedTuple):
    family: str  # amr, tasmota, shelly, zigbee2mqtt, esphome, homeassistant, or unknown
    outcome: str  # ok, partial, rejected, ignored: the label of amr_mqtt_messages_total
    items: list[Reading | Rejected]


class MessageDecoder:
    """Decodes messages with one device map (from the inventory) and one local time zone."""

    def __init__(self, devices: fmt.DeviceMap | None = None, local_tz: str = "Europe/Moscow") -> None:
        self.devices = devices or fmt.DeviceMap()
        self.local_tz = local_tz

    def __call__(self, m: Message) -> Decoded:
        """Never raises: a decoder bug becomes a dead-lettered message, not a stalled stream."""
        try:
            d = fmt.decode(m.topic, m.payload, m.received, local_tz=self.local_tz, layouts=self.devices.layouts)
            items = fmt.to_items(d, m.payload, self.devices)
        except Exception as exc:
            log.exception("decoding a message on %s failed", m.topic)
            return Decoded("unknown", "rejected", [Rejected(
                f"mqtt:{m.topic}"[:256], m.payload[:MAX_RAW_KEPT],
                f"the decoder failed on this message: {exc!r}", "decode_error")])
        readings = sum(type(i) is Reading for i in items)
        if d.ignored is not None:
            outcome = "ignored"
        elif d.values and readings == len(items):
            outcome = "ok"
        elif readings:
            outcome = "partial"
        else:
            outcome = "rejected"
        return Decoded(d.family or "unknown", outcome, items)
