"""Process configuration from `AMR_` environment variables (pydantic-settings).

Everything has a default that works on a developer's machine; the inventory
and tariff files carry the data, this carries where things are.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AMR_", env_file=None, extra="ignore")

    database_url: str = Field(
        default="",
        description="libpq URL of PostgreSQL/TimescaleDB; empty means none configured",
    )
    inventory: Path | None = Field(default=None, description="TOML inventory of subscribers and meters")
    tariffs: Path | None = Field(default=None, description="TOML tariff catalogue")
    timezone: str = Field(default="Europe/Moscow", description="local time of zones and bills")
    future_tolerance_s: int = Field(default=300, description="how far ahead of now a reading may be")
    clock_skew_tolerance_s: int = Field(default=60, description="meter clock difference flagged")
    iec_message_deadline_s: float = Field(
        default=120.0, gt=0,
        description="ceiling of the overall deadline of one IEC 62056-21 message (adapters/iec62056.py)",
    )
    spool_path: Path = Field(default=Path("var/spool.sqlite"), description="gateway spool file")
    spool_max_readings: int = Field(default=5_000_000, description="spool bound")
    spool_full_policy: str = Field(default="drop_oldest", description="drop_oldest | refuse_new")
    mqtt_url: str = Field(default="", description="mqtt://user@host:port of the broker; empty: none")
    mqtt_password: SecretStr | None = None
    mqtt_ca: Path | None = None
    mqtt_cert: Path | None = None
    mqtt_key: Path | None = None
    mqtt_group: str = Field(default="amr-collectors", description="shared subscription group")
    metrics_port: int = Field(default=9108, description="Prometheus /metrics port; 0 disables")
    metrics_refresh_s: float = Field(
        default=30.0, gt=0, description="how often database-wide gauges (stale meters, db up) are refreshed"
    )
    metrics_textfile: Path | None = Field(
        default=None, description="a one-shot command (amr bill) writes its amr_ metrics here, for node_exporter"
    )
    api_tokens: Path | None = Field(default=None, description="TOML of bearer tokens and accounts")
    log_format: str = Field(default="auto", description="auto | json | text")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process; tests build `Settings(...)` directly."""
    return Settings()
