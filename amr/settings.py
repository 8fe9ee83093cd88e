"""Process configuration from `AMR_` environment variables (pydantic-settings).

Everything has a default that works on a developer's machine; the inventory
and tariff files carry the data, this carries where things are.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from amr.errors import UserError

# Metering data is billing evidence: a customer may dispute a bill for three years
# (the general limitation period, Civil Code of the Russian Federation art. 196), so
# retention is never configured shorter than that; a supplier's own rules may ask more.
DISPUTE_HORIZON_MONTHS = 36


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AMR_", env_file=None, extra="ignore")

    database_url: str = Field(
        default="",
        description="libpq URL of PostgreSQL/TimescaleDB; empty means none configured",
    )
    inventory: Path | None = Field(default=None, description="TOML inventory of subscribers and meters")
    tariffs: Path | None = Field(default=None, description="TOML tariff catalogue, stored by `amr tariffs load` when it is given no FILE")
    timezone: str = Field(default="Europe/Moscow", description="local time of zones and bills")
    future_tolerance_s: int = Field(default=300, description="how far ahead of now a reading may be")
    clock_skew_tolerance_s: int = Field(default=60, description="meter clock difference flagged")
    max_reading_age_years: int = Field(
        default=15, ge=1,
        description="a reading older than this many years is refused as implausible (implausible_ts); "
        "readings before the zone calendar's first date are refused whatever this says",
    )
    retention: int | None = Field(
        default=None,
        description="months of readings to keep; unset (the default) keeps everything. Applied only "
        f"by `amr db maintain`; never below the dispute horizon of {DISPUTE_HORIZON_MONTHS} months",
    )
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
    api_max_body_bytes: int = Field(
        default=64 * 1024, ge=1024,
        description="largest request body `amr api` reads (bytes); a larger one is refused with 413 "
        "before it is read, and any body needs a known bearer token first (else 401)",
    )
    api_db_wait_s: float = Field(
        default=0.8, gt=0, le=30,
        description="how long an API request waits for a database connection before answering "
        "503 database_unavailable",
    )
    payment_provider_url: str = Field(
        default="", description="base URL of the card payment provider's API; empty: card payments are off"
    )
    payment_provider_name: str = Field(
        default="acquirer", pattern=r"^[a-z0-9_-]{1,32}$",
        description="the provider's short name, in ledger keys (card:<name>:<payment id>)",
    )
    payment_hmac_key: SecretStr | None = Field(
        default=None, description="key of the HMAC-SHA256 signature on the provider's callbacks; "
        "unset: every callback is refused",
    )
    payment_break: str = Field(
        default="23:50-00:10", pattern=r"^$|^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$",
        description="the bank's daily technical break, HH:MM-HH:MM Moscow time, in which no card "
        "payment can be started; empty: none",
    )
    payment_supplier: str = Field(
        default="Гарантирующий поставщик электроэнергии", min_length=1,
        description="the supplier as its card payment receipts name it",
    )
    average_months: int = Field(
        default=3, ge=1, le=12,
        description="a manual-metering month without readings is billed by the average of at most this "
        "many past months wholly read, for at most this many months in a row; then by the consumption "
        "norm (Government Decree 354 p. 59-60; some suppliers use 6)",
    )
    portal_writer_url: str = Field(
        default="",
        description="libpq URL the customer account (`amr portal`) writes readings and card payments "
        "with: the ingestion path and the payment tables. The pages read with AMR_DATABASE_URL, in "
        "production a login role that is only a member of amr_portal (it reads views and calls the "
        "narrow functions for users, sessions, links and the audit log); this second role needs what "
        "`amr collect` needs. Empty: AMR_DATABASE_URL writes too (one role for both, as in the demo)",
    )
    portal_base_url: str = Field(
        default="http://127.0.0.1:8090",
        description="the customer account's public address (`amr portal`), the start of every link "
        "in its e-mails (confirmation, password reset)",
    )
    portal_secure_cookies: bool = Field(
        default=True,
        description="the account's cookies carry Secure (sent over HTTPS only); false only for "
        "plain http://127.0.0.1 tests and demos",
    )
    smtp_url: str = Field(
        default="",
        description="where the account's e-mail goes: smtp://[user:password@]host:port "
        "(?starttls=true to upgrade the connection) or smtps://...; empty: no mail is sent and "
        "registration says so",
    )
    smtp_from: str = Field(
        default="Личный кабинет <noreply@localhost>",
        description="the From address of the account's e-mail",
    )
    log_format: str = Field(default="auto", description="auto | json | text")

    @field_validator("retention")
    @classmethod
    def _retention_covers_disputes(cls, months: int | None) -> int | None:
        if months is not None and months < DISPUTE_HORIZON_MONTHS:
            raise ValueError(
                f"AMR_RETENTION={months} months is shorter than the dispute horizon of "
                f"{DISPUTE_HORIZON_MONTHS} months: readings a customer may still dispute would be "
                "deleted; unset it to keep everything, or give at least that many months")
        return months


class SettingsError(UserError):
    """An AMR_ variable with a value that cannot be used: named, with what is allowed."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process; tests build `Settings(...)` directly.

    A bad value is a `SettingsError` naming each variable, so a command says
    which one to fix instead of printing pydantic's traceback.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "AMR_" + "_".join(str(p) for p in err["loc"]).upper()
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(msg if msg.startswith(name) else f"{name}: {msg}")
        raise SettingsError("; ".join(problems)) from None
