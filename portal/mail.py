"""The customer account's e-mail: confirmation and password-reset links, sent through SMTP.

AMR_SMTP_URL names the server: `smtp://host:port` (plain, as a local relay
or the tests' aiosmtpd), `smtp://host:587?starttls=true` (upgraded with
STARTTLS) or `smtps://host:465` (TLS from the start), each with an optional
`user:password@` (percent-encoded). The links start with AMR_PORTAL_BASE_URL.
A letter's text carries a link that opens the account: it is never logged,
and a failure to send is logged by the recipient's user id and the server's
reason only.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import parse_qs, unquote, urlsplit

from amr.errors import UserError
from amr.settings import Settings

log = logging.getLogger("amr.portal.mail")

TIMEOUT_S = 10.0


class MailNotConfigured(UserError):
    """AMR_SMTP_URL is empty or malformed: said plainly, with the shape it should have."""


class MailFailed(Exception):
    """The server refused the letter or could not be reached (the message names the reason)."""


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    user: str | None
    password: str | None
    starttls: bool
    tls: bool

    def __repr__(self) -> str:  # never the password
        return f"SmtpTarget({self.host}:{self.port}, user={self.user!r}, starttls={self.starttls}, tls={self.tls})"


def parse_smtp_url(url: str) -> SmtpTarget:
    """AMR_SMTP_URL as host, port, credentials and TLS mode; MailNotConfigured names what is wrong."""
    shape = "smtp://[user:password@]host:port[?starttls=true] or smtps://[user:password@]host:port"
    if not url:
        raise MailNotConfigured(f"AMR_SMTP_URL is not set: set it to {shape}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise MailNotConfigured(f"AMR_SMTP_URL has a port that is no number: expected {shape}") from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise MailNotConfigured(f"AMR_SMTP_URL must be {shape}")
    query = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
    starttls = query.get("starttls", "false") in ("1", "true", "yes")
    return SmtpTarget(
        host=parts.hostname, port=port or (465 if parts.scheme == "smtps" else 25),
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        starttls=starttls, tls=parts.scheme == "smtps")


def send(settings: Settings, to: str, subject: str, body: str) -> None:
    """Send one plain-text letter in Russian (UTF-8); MailFailed when the server does not take it."""
    target = parse_smtp_url(settings.smtp_url)
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="amr.portal")
    msg.set_content(body, charset="utf-8")
    try:
        smtp: smtplib.SMTP
        if target.tls:
            smtp = smtplib.SMTP_SSL(target.host, target.port, timeout=TIMEOUT_S,
                                    context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(target.host, target.port, timeout=TIMEOUT_S)
        with smtp:
            if target.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if target.user:
                smtp.login(target.user, target.password or "")
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        reason = type(exc).__name__ + (f" {exc.smtp_code}" if isinstance(exc, smtplib.SMTPResponseException) else "")
        raise MailFailed(f"the mail server {target.host}:{target.port} did not take the letter ({reason})") from None


def link(settings: Settings, path: str) -> str:
    return settings.portal_base_url.rstrip("/") + path


def confirmation_letter(login: str, url: str, hours: int) -> tuple[str, str]:
    return ("Подтверждение адреса электронной почты",
            f"Здравствуйте, {login}!\n\n"
            "Чтобы подтвердить адрес электронной почты в личном кабинете, откройте ссылку:\n\n"
            f"{url}\n\n"
            f"Ссылка действует {hours} ч и только один раз.\n"
            "Если вы не регистрировались в личном кабинете, просто удалите это письмо.\n")


def reset_letter(login: str, url: str, minutes: int) -> tuple[str, str]:
    return ("Восстановление пароля",
            f"Здравствуйте, {login}!\n\n"
            "Для входа в личный кабинет запрошен новый пароль. Чтобы задать его, откройте ссылку:\n\n"
            f"{url}\n\n"
            f"Ссылка действует {minutes} мин и только один раз.\n"
            "Если вы не запрашивали восстановление пароля, ничего не делайте: пароль останется прежним.\n")
