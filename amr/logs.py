"""Structured logging for every `amr` process.

On a terminal a person reads the lines, so they are short text; under
systemd, in a container or piped to a file a machine reads them, so they are
JSON objects, one a line. Lines about a device carry `meter` and `bus` fields
(pass them with `extra={"meter": ..., "bus": ..., "adapter": ...}`),
because "timeout" without the meter and the bus is useless at 3 a.m.

A filter on the handler scrubs secrets (passwords, tokens, URLs with a
password) from every message and field before anything is written: a log
file is copied into tickets and chats, a credential in it is a leak.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TextIO

# fields a record may carry about the device or the run; printed when present
DEVICE_FIELDS = ("meter", "bus", "adapter", "account", "register")
_REDACTED = "***"

# attributes every LogRecord has; anything else on a record came via `extra`
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)

# secret patterns, applied to every message and every extra value that is text
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?P<post>@)"), r"\g<pre>***\g<post>"),
    # libpq key=value strings and query parameters: password=..., token=...
    (
        re.compile(
            r"(?i)(?P<key>\b(?:password|passwd|pwd|secret|token|api_key|apikey|access_token)\s*[=:]\s*)"
            r"(?P<q>['\"]?)[^\s'\"&,;}]+(?P=q)"
        ),
        r"\g<key>\g<q>***\g<q>",
    ),
    # HTTP authorisation headers
    (re.compile(r"(?i)(?P<key>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{6,}"), r"\g<key>***"),
)
# extra keys whose values are secret whatever they look like
_SECRET_KEYS = re.compile(r"(?i)(password|passwd|secret|token|api_key|apikey|authorization|credential)")


# environment variables whose values (or the password inside them) are this process's secrets
_SECRET_ENV = ("AMR_DATABASE_URL", "AMR_MQTT_URL", "AMR_MQTT_PASSWORD", "PGPASSWORD", "DATABASE_URL", "AMR_SMTP_URL")
# shorter ones would mask ordinary words in every line; they are no protection anyway.
# Secrets given for one message (the URL it is about) may be a little shorter.
_MIN_SECRET_LEN, _MIN_GIVEN_LEN = 4, 3


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace every secret this module recognises in `text` with ***.

    Patterns catch the shapes secrets come in (user:pw@ in a URL,
    password=..., Bearer ...); on top of that every literal secret in
    `secrets` and every one this process is configured with (the password of
    AMR_DATABASE_URL and AMR_MQTT_URL, AMR_MQTT_PASSWORD, PGPASSWORD) is
    masked wherever it appears, because libpq's messages quote a malformed
    URL in shapes no pattern foresees.
    """
    for secret in secrets:
        if len(secret) >= _MIN_GIVEN_LEN and secret in text:
            text = text.replace(secret, _REDACTED)
    for secret in _configured_secrets():
        if len(secret) >= _MIN_SECRET_LEN and secret in text:
            text = text.replace(secret, _REDACTED)
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _configured_secrets() -> tuple[str, ...]:
    return _secrets_of(tuple(os.environ.get(name, "") for name in _SECRET_ENV))


@lru_cache(maxsize=8)
def _secrets_of(values: tuple[str, ...]) -> tuple[str, ...]:
    """The literal secrets in the values of _SECRET_ENV (cached: the environment rarely changes)."""
    from amr.storage.db import url_secrets

    out: list[str] = []
    for name, value in zip(_SECRET_ENV, values, strict=True):
        if not value:
            continue
        out += url_secrets(value) if name.endswith("URL") else [value]
    return tuple(sorted(set(out), key=len, reverse=True))


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return _REDACTED
    if isinstance(value, str):
        return redact(value)
    if hasattr(value, "get_secret_value"):  # pydantic SecretStr
        return _REDACTED
    return value


class SecretFilter(logging.Filter):
    """Scrubs secrets from the message, its arguments and every extra field.

    It formats the message once (msg % args) and stores the result, so a
    secret passed as an argument cannot slip through the formatting later.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill the process
            message = f"{record.msg!r} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, _redact_value(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# fields libraries add for their own terminal output (uvicorn's ANSI-coloured copy of msg)
_DROPPED = frozenset({"color_message"})


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _DROPPED and not k.startswith("_")
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC), level, logger, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, _jsonable(value))
        if record.exc_text or record.exc_info:
            out["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: time, level, [bus meter], message, other fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = _extras(record)
        where = " ".join(f"{k}={extras.pop(k)}" for k in ("bus", "meter") if k in extras)
        rest = " ".join(f"{k}={v}" for k, v in extras.items())
        parts = [stamp, f"{record.levelname:<7}", f"[{where}]" if where else "", record.getMessage(), rest]
        line = " ".join(p for p in parts if p)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def choose_format(requested: str | None, stream: TextIO) -> str:
    """'json' or 'text': AMR_LOG_FORMAT wins; 'auto' means text on a terminal only."""
    fmt = (requested or os.environ.get("AMR_LOG_FORMAT") or "auto").strip().lower()
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"AMR_LOG_FORMAT must be auto, json or text, got {fmt!r}")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return "text" if isatty is not None and isatty() else "json"
    return fmt


_HANDLER_MARK = "_amr_handler"


def setup(level: str | int = "INFO", fmt: str | None = None, stream: TextIO | None = None) -> logging.Handler:
    """Install the project's handler on the root logger (idempotent: replaces ours).

    Call once at process start; `fmt` overrides AMR_LOG_FORMAT. The level can
    also come from AMR_LOG_LEVEL.
    """
    stream = stream or sys.stderr
    chosen = choose_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(SecretFilter())
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    chosen_level = os.environ.get("AMR_LOG_LEVEL") or level
    root.setLevel(chosen_level.upper() if isinstance(chosen_level, str) else chosen_level)
    return handler
