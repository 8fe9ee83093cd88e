"""Broker connection settings shared by the collector and the gateway uplink.

One place turns `AMR_MQTT_URL` and the TLS/credential settings into a
connected paho-mqtt 2.x client speaking MQTT 5 with a persistent session.
The password is a `SecretStr` and only `describe()` output, which never
contains it, goes to logs.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from amr.errors import UserError

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps a collector's queue a week


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: SecretStr | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def describe(self) -> str:
        """For logs and errors: never includes the password."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(
    url: str,
    password: SecretStr | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> BrokerConfig:
    """`mqtt://user@host:1883` or `mqtts://host:8883` (TLS); the password comes separately.

    A password written into the URL is accepted but kept secret as well.
    """
    if not url:
        raise UserError("no MQTT broker configured: set AMR_MQTT_URL, like mqtt://collector@127.0.0.1:1883")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise UserError(f"AMR_MQTT_URL: scheme {parts.scheme!r} unknown: use mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl") or ca is not None
    if not parts.hostname:
        raise UserError("AMR_MQTT_URL: no host, like mqtt://127.0.0.1:1883")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise UserError("AMR_MQTT_URL: the port is not a number") from None
    if parts.password and password is None:
        password = SecretStr(unquote(parts.password))
    for name, path in (("AMR_MQTT_CA", ca), ("AMR_MQTT_CERT", cert), ("AMR_MQTT_KEY", key)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{name}: no such file {path}")
    if (cert is None) != (key is None):
        raise UserError("AMR_MQTT_CERT and AMR_MQTT_KEY go together: set both for a client certificate")
    return BrokerConfig(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=password,
        ca=ca,
        cert=cert,
        key=key,
    )


def broker_from_settings(settings: object) -> BrokerConfig:
    return parse_broker_url(
        settings.mqtt_url,  # type: ignore[attr-defined]
        settings.mqtt_password,  # type: ignore[attr-defined]
        settings.mqtt_ca,  # type: ignore[attr-defined]
        settings.mqtt_cert,  # type: ignore[attr-defined]
        settings.mqtt_key,  # type: ignore[attr-defined]
    )


def make_client(cfg: BrokerConfig, client_id: str, *, persistent: bool = True) -> mqtt.Client:
    """A paho client (MQTT 5) configured for `cfg`, not yet connected."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if cfg.username:
        client.username_pw_set(
            cfg.username, cfg.password.get_secret_value() if cfg.password else None
        )
    if cfg.tls:
        client.tls_set(
            ca_certs=str(cfg.ca) if cfg.ca else None,
            certfile=str(cfg.cert) if cfg.cert else None,
            keyfile=str(cfg.key) if cfg.key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect_properties(*, persistent: bool = True, receive_maximum: int = 1000) -> Properties:
    """CONNECT properties: a session the broker keeps across our restarts."""
    props = Properties(PacketTypes.CONNECT)
    if persistent:
        props.SessionExpiryInterval = SESSION_EXPIRY_S
    props.ReceiveMaximum = receive_maximum
    return props


class Connection:
    """Tracks the connection state of a client started with `loop_start()`."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.last_error = ""

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = str(reason_code)
            self.up.clear()
        else:
            self.up.set()

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.last_error = str(reason_code)
        self.up.clear()
