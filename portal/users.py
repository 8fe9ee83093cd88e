"""Users of the customer account: checking what they type, passwords, sessions, one-time links.

The rules live here, the pages (portal/auth_routes.py) only call them:

- A login is 3-32 Latin letters, digits, '.', '_' or '-', unique whatever its case,
  and never changes. A password is 8-128 characters and not the login.
- Passwords are hashed with argon2id (argon2-cffi's defaults). For a login that
  does not exist a dummy hash is checked all the same, so the answer takes as long
  and says the same ("Неверный логин или пароль").
- A session is a random token in an HttpOnly cookie; the database keeps its SHA-256.
  Without "remember me" it lasts SESSION_HOURS and the cookie ends with the browser;
  with it, REMEMBER_DAYS. A password change ends every session.
- Confirmation and reset links carry a random token, kept as SHA-256, used once,
  expiring (CONFIRM_HOURS, RESET_MINUTES).
- Failed logins are counted per login and per address, in two windows (15 minutes
  and a day), so the lockout grows: LOGIN_LIMITS.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from portal import web

LOGIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD, MAX_PASSWORD = 8, 128
CONFIRM_HOURS = 48
RESET_MINUTES = 60
# the versions of the texts a user accepts; a new text gets a new version
LICENCE_VERSION = "2026-12-01"
PD_CONSENT_VERSION = "2026-12-01"

# (key prefix, limit, window seconds): failures per login and per address
LOGIN_LIMITS = (("login", 5, 15 * 60), ("login", 20, 24 * 3600),
                ("login-ip", 30, 15 * 60), ("login-ip", 200, 24 * 3600))

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def password_matches(stored_hash: str | None, password: str) -> bool:
    """Check a password against its hash; with no hash (no such login) a dummy one, as slowly."""
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def normalize_phone(text: str) -> str | None:
    """A Russian mobile number as +7XXXXXXXXXX; '' is None; ValueError for anything else."""
    digits = re.sub(r"[\s()+-]", "", text)
    if not digits:
        return None
    if not digits.isdigit():
        raise ValueError("телефон может содержать только цифры, пробелы, скобки, «+» и «-»")
    if len(digits) == 11 and digits[0] in "78":
        digits = digits[1:]
    if len(digits) != 10 or digits[0] != "9":
        raise ValueError("укажите мобильный номер: +7 и 10 цифр, начиная с 9")
    return "+7" + digits


def password_problem(password: str, login: str) -> str | None:
    if len(password) < MIN_PASSWORD:
        return f"Пароль должен быть не короче {MIN_PASSWORD} символов."
    if len(password) > MAX_PASSWORD:
        return f"Пароль должен быть не длиннее {MAX_PASSWORD} символов."
    if password.lower() == login.lower():
        return "Пароль не должен совпадать с логином."
    return None


def email_problem(email: str) -> str | None:
    if not EMAIL_RE.match(email) or len(email) > 254:
        return "Укажите адрес электронной почты, например ivanov@example.ru."
    return None


def registration_problems(login: str, password: str, password2: str, email: str, phone: str,
                          licence: bool, pd_consent: bool) -> tuple[list[str], str | None]:
    """What is wrong with a registration form (in Russian), and the phone normalised."""
    problems = []
    if not LOGIN_RE.match(login):
        problems.append("Логин: от 3 до 32 латинских букв, цифр и знаков «.», «_», «-», "
                        "начиная с буквы или цифры.")
    if p := password_problem(password, login):
        problems.append(p)
    elif password != password2:
        problems.append("Пароли не совпадают.")
    if p := email_problem(email):
        problems.append(p)
    normal_phone = None
    try:
        normal_phone = normalize_phone(phone)
    except ValueError as exc:
        problems.append(f"Телефон: {exc}.")
    if not licence:
        problems.append("Нужно принять условия пользовательского соглашения.")
    if not pd_consent:
        problems.append("Нужно дать согласие на обработку персональных данных.")
    return problems, normal_phone


@dataclass(frozen=True)
class Account:
    id: int
    login: str
    email: str
    email_confirmed: bool
    password_hash: str


def by_login(conn: psycopg.Connection, login: str) -> Account | None:
    row = conn.execute("SELECT id, login, email, email_confirmed_at IS NOT NULL, password_hash"
                       " FROM portal_user WHERE lower(login) = lower(%s)", (login,)).fetchone()
    return Account(*row) if row else None


def by_id(conn: psycopg.Connection, user_id: int) -> Account | None:
    row = conn.execute("SELECT id, login, email, email_confirmed_at IS NOT NULL, password_hash"
                       " FROM portal_user WHERE id = %s", (user_id,)).fetchone()
    return Account(*row) if row else None


def by_login_or_email(conn: psycopg.Connection, text: str) -> list[Account]:
    rows = conn.execute("SELECT id, login, email, email_confirmed_at IS NOT NULL, password_hash"
                        " FROM portal_user WHERE lower(login) = lower(%s) OR lower(email) = lower(%s)"
                        " ORDER BY id LIMIT 5", (text, text)).fetchall()
    return [Account(*r) for r in rows]


def create_user(conn: psycopg.Connection, login: str, password: str, email: str, phone: str | None) -> int | None:
    """The new user's id, or None when the login is taken (in any case)."""
    row = conn.execute("SELECT portal_user_create(%s, %s, %s, %s, %s, %s)",
                       (login, hash_password(password), email, phone, LICENCE_VERSION,
                        PD_CONSENT_VERSION)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def start_session(conn: psycopg.Connection, user_id: int, remember: bool, ip: str, user_agent: str) -> tuple[str, int | None]:
    """A new session: (the cookie's token, the cookie's max-age or None for a browser session)."""
    token = secrets.token_urlsafe(32)
    lifetime = timedelta(days=web.REMEMBER_DAYS) if remember else timedelta(hours=web.SESSION_HOURS)
    conn.execute("SELECT portal_session_create(%s, %s, %s, %s, %s, %s)",
                 (user_id, web.token_hash(token), datetime.now(UTC) + lifetime, remember, ip, user_agent))
    return token, int(lifetime.total_seconds()) if remember else None


def end_session(conn: psycopg.Connection, token: str) -> None:
    conn.execute("SELECT portal_session_revoke(%s)", (web.token_hash(token),))


def end_all_sessions(conn: psycopg.Connection, user_id: int) -> int:
    row = conn.execute("SELECT portal_session_revoke_all(%s)", (user_id,)).fetchone()
    return int(row[0]) if row else 0


def set_password(conn: psycopg.Connection, user_id: int, password: str) -> None:
    """A new password; every session of the user ends (the caller starts a new one for this browser)."""
    conn.execute("SELECT portal_user_set_password(%s, %s)", (user_id, hash_password(password)))


def issue_token(conn: psycopg.Connection, kind: str, user_id: int, email: str) -> str:
    """A one-time token for a link (kind confirm_email or reset_password); only its hash is stored."""
    token = secrets.token_urlsafe(32)
    ttl = timedelta(hours=CONFIRM_HOURS) if kind == "confirm_email" else timedelta(minutes=RESET_MINUTES)
    conn.execute("SELECT portal_token_create(%s, %s, %s, %s, %s)",
                 (kind, user_id, web.token_hash(token), email, datetime.now(UTC) + ttl))
    return token


def token_state(conn: psycopg.Connection, kind: str, token: str) -> str:
    """'ok', 'used', 'expired' or 'unknown', without using the token (to show a form)."""
    if not token or len(token) > 200:
        return "unknown"
    row = conn.execute("SELECT used_at IS NOT NULL, expires_at <= now() FROM portal_token"
                       " WHERE kind = %s AND token_hash = %s", (kind, web.token_hash(token))).fetchone()
    if row is None:
        return "unknown"
    return "used" if row[0] else "expired" if row[1] else "ok"


def use_token(conn: psycopg.Connection, kind: str, token: str) -> tuple[str, int | None]:
    """Use a one-time token: ('ok', user id) once, then ('used', ...); ('expired'|'unknown', ...)."""
    if not token or len(token) > 200:
        return "unknown", None
    row = conn.execute("SELECT status, user_id FROM portal_token_use(%s, %s)",
                       (kind, web.token_hash(token))).fetchone()
    return (str(row[0]), row[1]) if row else ("unknown", None)
