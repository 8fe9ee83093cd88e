"""`amr mqtt decode` (what a message yields, and why not) and `amr collect` (the consumer daemon)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from amr.errors import UserError

log = logging.getLogger("amr.mqtt")

_FORMATS = ("amr", "tasmota", "shelly", "zigbee2mqtt", "esphome", "homeassistant")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mqtt", help="MQTT payloads: decode a message the way the collector would",
        description="Tools for MQTT meters and gateways.",
    )
    msub = p.add_subparsers(dest="mqtt_command", metavar="ACTION", required=True)
    d = msub.add_parser(
        "decode",
        help="print the readings one MQTT message yields, or the exact reason it yields none",
        description=(
            "Decode one MQTT message as the collector would, without a broker, a database or an "
            "inventory: the tool for a device whose data does not show up. The format is detected "
            "from the topic (amr/v1/<source>/readings, tele/<device>/SENSOR, "
            "shellies/<id>/emeter/<n>/total, <id>/status/emdata:0, zigbee2mqtt/<device>) unless "
            "--format is given: then any topic that ends like the family's pattern is taken, whatever "
            "its prefix (a custom Tasmota FullTopic, Zigbee2MQTT base_topic or Shelly topic prefix; "
            "ESPHome <prefix>/sensor/<name>/state). The device id printed is what goes into the "
            "inventory ([[meter]] adapter = \"mqtt\", device = \"...\", and topic_prefix or topic "
            "for a layout of its own; amr mqtt listen writes these). Exit status 1 when the message "
            "yields no reading."
        ),
    )
    d.add_argument("topic", help="the MQTT topic, like tele/plug-7/SENSOR")
    d.add_argument("payload", help="the payload text; '-' reads it from standard input, @FILE from a file")
    d.add_argument("--format", choices=_FORMATS,
                   help="payload family, when the topic is not in its default layout (any prefix is then taken)")
    d.add_argument("--json", action="store_true",
                   help="one JSON object per reading: device, register, ts, value (kWh); "
                        "problems as objects with code and reason")
    d.add_argument("--timezone", default=None,
                   help="zone of device clocks that publish local time without an offset "
                        "(default AMR_TIMEZONE, Europe/Moscow)")
    d.set_defaults(func=cmd_decode)

    li = msub.add_parser(
        "listen",
        help="hear the broker for a while: every device with its family, registers and a ready inventory entry",
        description=(
            "Subscribe to every topic at AMR_MQTT_URL for --seconds and list each device heard: its family "
            "and format, the registers it yields and a ready [[meter]] entry (TOML), with the topic_prefix, "
            "topic or fields it needs when it is not set up the default way. Home Assistant discovery "
            "configs of energy sensors become meters too. Messages it cannot place are listed with the "
            "reason. Needs no database and no inventory; writes nothing but --toml. Exit status 1 when "
            "no device was heard."
        ),
    )
    li.add_argument("--seconds", type=float, default=30, help="how long to listen (30); retained messages come first")
    li.add_argument("--topic", default="#", help="topic filter to listen to (default '#': everything)")
    li.add_argument("--toml", type=Path, default=None, help="write the inventory entries to this file too")
    li.add_argument("--account", default="0", help="account the entries are written with (a placeholder: 0)")
    li.add_argument("--timezone", default=None,
                    help="zone of device clocks without an offset (default AMR_TIMEZONE, Europe/Moscow)")
    li.set_defaults(func=cmd_listen)

    dr = msub.add_parser(
        "drain",
        help="send what a gateway spool holds upstream, in order, and exit when it is empty",
        description=(
            "Drain a gateway spool file (default AMR_SPOOL_PATH) the way a running gateway's "
            "uplink does: in order, in bounded batches, each removed only after the broker "
            "acknowledged it with success (QoS 1, PUBACK reason code 0: a broker with no subscriber "
            "for the topic answers 16 and the batch stays) or, with --to database, after it was "
            "committed. Use it to empty the spool of a gateway that is out of service (stop the "
            "gateway first: one process owns a spool). Interrupted, it loses nothing: run it again. "
            "A damaged spool file is salvaged first, as the gateway does."
        ),
    )
    dr.add_argument("--spool", type=Path, default=None, help="spool file (default AMR_SPOOL_PATH)")
    dr.add_argument("--to", choices=("mqtt", "database"), default="mqtt",
                    help="AMR_MQTT_URL (default) or AMR_DATABASE_URL")
    dr.add_argument("--topic", default=None, help="topic to publish to (default amr/v1/<hostname>/readings)")
    dr.add_argument("--batch", type=int, default=500, help="readings per message or transaction (500)")
    dr.add_argument("--follow", action="store_true", help="keep draining as new readings arrive; never exit")
    dr.set_defaults(func=cmd_drain)

    c = sub.add_parser(
        "collect",
        help="run the MQTT collector: consume meters and gateways, store readings (daemon)",
        description=(
            "Subscribe to the broker at AMR_MQTT_URL with an MQTT 5 shared subscription "
            "($share/AMR_MQTT_GROUP/...), decode every message, store its readings in "
            "AMR_DATABASE_URL and acknowledge it only after the commit. Run as many as needed "
            "with distinct --client-id values; each keeps a persistent session under its id, so "
            "restart a collector with the same id to get back what the broker kept for it. "
            "Devices are mapped to meters by the inventory (AMR_INVENTORY, meters with "
            "adapter = \"mqtt\" and a device). A database that cannot take writes (down, a "
            "read-only standby, no INSERT privilege, a malformed AMR_DATABASE_URL) is said at start "
            "in one line and shown as amr_db_up 0; the messages wait unacknowledged until it can. "
            "Stops cleanly on SIGTERM or Ctrl-C."
        ),
    )
    c.add_argument("--client-id", default=None,
                   help="stable MQTT client id of this collector (default amr-collector-<hostname>)")
    c.add_argument("--formats", default=",".join(_FORMATS),
                   help=f"comma-separated payload families to subscribe to (default {','.join(_FORMATS)})")
    c.add_argument("--batch", type=int, default=500, help="most messages stored in one transaction (500)")
    c.add_argument("--batch-wait", type=float, default=0.05,
                   help="seconds to wait for more messages before storing a batch (0.05)")
    c.add_argument("--workers", type=_workers, default=_default_workers(),
                   help="ingestion processes, each with its own database connection; every gateway's "
                        "or device's topic always goes to the same one, so they do not wait on each "
                        "other's meters "
                        f"(default: the CPU count up to 4, here {_default_workers()}; 1 stores in this process)")
    c.add_argument("--inventory", type=Path, default=None, help="inventory file (default AMR_INVENTORY)")
    c.set_defaults(func=cmd_collect)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes, got {text!r}") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected 1 to 64 processes, got {n}")
    return n


def _payload(arg: str) -> bytes:
    if arg == "-":
        return sys.stdin.buffer.read()
    if arg.startswith("@"):
        try:
            return Path(arg[1:]).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read payload file {arg[1:]}: {exc.strerror}") from None
    return arg.encode("utf-8")


def cmd_decode(args: argparse.Namespace) -> int:
    from adapters import mqtt_formats as fmt
    from amr.settings import get_settings

    tz = args.timezone or get_settings().timezone
    d = fmt.decode(args.topic, _payload(args.payload), datetime.now(UTC), family=args.format, local_tz=tz)
    if args.json:
        for v in d.values:
            print(json.dumps({"device": v.device, "register": v.register, "ts": v.ts.isoformat(),
                              "value": str(v.value), "format": d.format,
                              "quality": sorted(v.quality)}))
        for p in d.problems:
            print(json.dumps({"problem": p.code, "reason": p.reason, "device": p.device,
                              "register": p.register, "format": d.format}))
        for x in d.forwarded:
            print(json.dumps({"forwarded_reject": x.code, "reason": x.reason, "meter": x.meter_id}))
        if d.ignored:
            print(json.dumps({"ignored": d.ignored, "format": d.format}))
    else:
        if d.format:
            print(f"format {d.format} ({d.family})")
        for v in d.values:
            if "meter_clock" in v.quality:
                clock = "device clock"
            elif d.family == "amr":  # the gateway's poll time, sent in the message
                clock = "time in the message"
            else:
                clock = "time of receipt"
            print(f"  {v.device}  {v.register}  {v.ts.isoformat()}  {v.value} kWh  ({clock})")
        for p in d.problems:
            where = f"device {p.device!r}: " if p.device and p.device not in p.reason else ""
            print(f"  no reading: {where}{p.reason} [{p.code}]")
        for x in d.forwarded:
            print(f"  forwarded reject from the gateway: {x.reason} [{x.code}]")
        if d.ignored:
            print(f"  no reading: {d.ignored} (ignored, not an error)")
        if not d.values and not d.problems and not d.ignored and not d.forwarded:
            print("  no reading: the message carries no readings")
    return 0 if d.values else 1


def cmd_listen(args: argparse.Namespace) -> int:
    from amr.settings import get_settings
    from collector.mqtt.client import broker_from_settings
    from collector.mqtt.listen import Listener, inventory_toml, listen

    settings = get_settings()
    broker = broker_from_settings(settings)
    if args.seconds <= 0:
        raise UserError("--seconds: give a positive number of seconds")
    if not args.account.isdigit():
        raise UserError(f"--account: an account is digits, got {args.account!r}")
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())  # Ctrl-C: report what was heard so far
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())

    def ready() -> None:
        print(f"listening to {args.topic!r} at {broker.describe()} for {args.seconds:g} s (Ctrl-C stops "
              "early and reports)...", file=sys.stderr, flush=True)

    try:
        heard = listen(broker, args.seconds, f"amr-listen-{socket.gethostname()}-{os.getpid()}",
                       Listener(args.timezone or settings.timezone), topic_filter=args.topic, stop=stop,
                       on_ready=ready)
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    devices, unplaced = heard.report()
    print(f"{heard.messages} messages: {len(devices)} devices, {len(unplaced)} topics not placed, "
          f"{heard.ignored} without counters by design")
    for s in devices:
        keys = "".join(f", {k} {v!r}" for k, v in s.keys.items())
        print(f"  {s.family:13} {s.device}  registers {', '.join(sorted(s.registers))}  "
              f"(format {s.format}, {s.messages} messages on {s.topic}{keys})")
    for u in unplaced:
        print(f"  not placed: {u.topic} ({u.messages} messages): {u.reason}")
    text = inventory_toml(devices, args.account)
    if args.toml is not None:
        args.toml.write_text(text, encoding="utf-8")
        print(f"inventory entries written to {args.toml}", file=sys.stderr)
    else:
        print()
        print(text)
    return 0 if devices else 1


def cmd_collect(args: argparse.Namespace) -> int:
    from adapters import mqtt_formats as fmt
    from amr import logs
    from amr.metrics_http import serve_metrics
    from amr.settings import get_settings
    from collector.fleet import stale_meters
    from collector.mqtt.client import broker_from_settings
    from collector.mqtt.consumer import Consumer

    settings = get_settings()
    logs.setup()
    if not settings.database_url:
        raise UserError("no database configured: set AMR_DATABASE_URL")
    broker = broker_from_settings(settings)
    families = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in families if f not in _FORMATS]
    if unknown:
        raise UserError(f"--formats: unknown {', '.join(unknown)}; known: {', '.join(_FORMATS)}")
    inv_path = args.inventory or settings.inventory
    consumer = Consumer(
        broker, settings.database_url, args.client_id or f"amr-collector-{socket.gethostname()}",
        group=settings.mqtt_group, devices=fmt.DeviceMap(), families=families, settings=settings,
        batch_messages=args.batch, batch_wait=args.batch_wait, local_tz=settings.timezone,
        workers=args.workers,
    )
    if inv_path is not None:
        # the device map comes from the inventory; SIGHUP reloads it (a bad file keeps the old map)
        from collector.config import install_collector_reload

        install_collector_reload(consumer, inv_path, settings)  # loads it now, and on every SIGHUP
        for warning in consumer.devices.warnings:
            log.warning("inventory %s: %s", inv_path, warning)
    else:
        log.warning("no inventory (AMR_INVENTORY): only amr/v1 messages can be stored; "
                    "device messages are rejected as unknown devices")
        signal.signal(signal.SIGHUP, lambda signum, frame: log.warning("SIGHUP: no inventory to reload"))
    endpoint = serve_metrics(settings, db_url=settings.database_url, stale=stale_meters)

    def _stop(signum: int, frame: object) -> None:
        consumer.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # what the daemon waits for, before it waits: a quiet collector must not look hung
    from amr.storage.db import describe_database

    log.info("collector %s waits for messages from %s on %s (shared group %s) and stores them in %s",
             consumer.client_id, broker.describe(), ", ".join(consumer.filters), settings.mqtt_group,
             describe_database(settings.database_url))
    try:
        consumer.run()
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    import time

    from amr import logs
    from amr.settings import get_settings
    from amr.storage.db import describe_database
    from collector.gateway.spool import Spool, SpoolError
    from collector.gateway.uplink import IngestForwarder, MqttForwarder, Uplink
    from collector.mqtt.client import broker_from_settings

    settings = get_settings()
    logs.setup()
    path = args.spool or settings.spool_path
    if not Path(path).exists():
        raise UserError(f"no spool file {path}")
    try:
        spool = Spool(path, settings.spool_max_readings, settings.spool_full_policy)
    except SpoolError as exc:
        raise UserError(str(exc)) from None
    forwarder: MqttForwarder | IngestForwarder
    if args.to == "mqtt":
        broker = broker_from_settings(settings)
        forwarder = MqttForwarder(broker, args.topic)
        to = f"{broker.describe()} topic {forwarder.topic}"
    else:
        if not settings.database_url:
            raise UserError("--to database: set AMR_DATABASE_URL")
        forwarder = IngestForwarder(settings.database_url, settings)
        to = describe_database(settings.database_url)
    uplink = Uplink(spool, forwarder, batch_size=args.batch)
    stop = {"now": False}

    def _stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    started = len(spool)
    then = "; then waits for new readings (Ctrl-C stops)" if args.follow else ""
    print(f"draining {started} readings from {path} to {to}{then}", file=sys.stderr, flush=True)
    uplink.start()
    try:
        while not stop["now"] and (args.follow or len(spool) > 0):
            time.sleep(0.1)
    finally:
        uplink.stop()
        left = len(spool)
        spool.close()
    print(f"delivered {uplink.delivered} readings; {left} left in the spool", file=sys.stderr)
    return 0 if left == 0 else 1
