"""What every page of the customer account uses: templates, the user, CSRF, the database, audit, limits.

This is the contract the page modules (portal/auth_routes.py, portal/account_routes.py)
code against. A route module defines `router = APIRouter()` and is included by
`portal.app.create_app`. The pieces:

- `templates` (Jinja2 on portal/templates/) and `render(request, name, status_code=200, **context)`:
  every template extends "base.html" and gets `user` (a `PortalUser` or None),
  `csrf_token` (put `<input type="hidden" name="csrf_token" value="{{ csrf_token }}">` in
  every POST form) and `flashes` (messages set by `redirect(..., flash=...)`). The
  formatting filters (money, dates, kWh, zones) are portal/formatting.py's FILTERS,
  registered on `templates.env.filters` by portal.app.create_app: one home for each format.
- `require_user` (or the alias `CurrentUser`): a dependency giving the logged-in `PortalUser`;
  without a valid session a GET is redirected to /login?next=<path>, anything else gets
  the login page with 401. `optional_user(request)` gives the user or None.
- `csrf_protect`: put `dependencies=[Depends(csrf_protect)]` (or the alias `CsrfChecked`) on
  every POST route. The token is derived from the session cookie (or, before login,
  from an anonymous cookie render() sets), so it is tied to the session; a missing or
  forged token, or an Origin header of another site, is a 403 page in Russian.
- `db(request)`: `with db(request) as conn:` gives a psycopg connection in a
  transaction (committed at the end, rolled back on an error) from the pool of
  billing.api.DatabaseGate; with the database down it raises DatabaseUnavailable,
  which the app turns into a 503 page in Russian. Never hold it across a redirect.
- `audit(conn, user_id, action, detail, request=None)`: one row of portal_audit_log. Keys
  that look like secrets (password, token, link, hash, answer, captcha) are dropped.
- `rate_limit(conn, key, limit, window_s)`: counts one attempt under `key` in the
  database (so every portal process agrees) and raises `RateLimited` ("Слишком много
  попыток, попробуйте через N мин.", a 429 page) when the window holds more than
  `limit`. `rate_check(conn, key, limit, window_s)` raises without counting,
  `rate_exceeded` says the seconds to wait (or None), `rate_hit` only counts,
  `rate_clear` forgets a key.
  Keys: "<what>:<who>", like "link:user:42" or "link-ip:203.0.113.5"; `client_ip(request)`.
- `redirect(url, flash=None)`: a 303 to a local path with an optional message for the next page.
- `PortalError(status, title, message)`: raise it for a page that says what went wrong
  (rendered with error.html); `not_found()` is the one 404 for a missing account and
  for another user's account alike.

Writes go through the SECURITY DEFINER functions of migration 020 (portal_*), so
the database role the pages run as (a member of amr_portal) only reads tables.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import psycopg
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from psycopg.types.json import Jsonb
from starlette.concurrency import run_in_threadpool

from amr.settings import Settings

log = logging.getLogger("amr.portal")

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

FLASH_COOKIE = "amr_flash"
SESSION_HOURS = 12          # a session without "remember me" (the cookie also ends with the browser)
REMEMBER_DAYS = 30          # with "remember me"


# --- errors a page shows -----------------------------------------------------------------

class PortalError(Exception):
    """A refusal shown to the customer as a page (error.html) with this status."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class LoginRequired(Exception):
    """No valid session: the app's handler redirects a GET to /login?next=..."""


class CsrfFailed(PortalError):
    def __init__(self) -> None:
        super().__init__(403, "Запрос отклонён",
                         "Форма устарела или отправлена не с этого сайта. Обновите страницу и "
                         "попробуйте ещё раз.")


class RateLimited(PortalError):
    def __init__(self, retry_after_s: int):
        minutes = max(1, math.ceil(retry_after_s / 60))
        super().__init__(429, "Слишком много попыток",
                         f"Слишком много попыток, попробуйте через {minutes} мин.")
        self.retry_after_s = retry_after_s


def not_found() -> PortalError:
    """The one answer for a page that does not exist and for one that is not this user's."""
    return PortalError(404, "Страница не найдена", "Такой страницы нет или она вам недоступна.")


# --- the database ---------------------------------------------------------------------------

@contextmanager
def db(request: Request) -> Iterator[psycopg.Connection]:
    """A pooled connection in a transaction; DatabaseUnavailable (a 503 page) when the database is down."""
    gate = request.app.state.database
    with gate.connection() as conn:
        yield conn


@contextmanager
def writer_db(request: Request, pages: psycopg.Connection | None = None) -> Iterator[psycopg.Connection]:
    """A connection of the writing role (AMR_PORTAL_WRITER_URL), for readings and card payments.

    Only account_data.enter_readings and billing.payments run on it, after the
    pages' own connection has checked that the user linked the account. With
    no writing role configured the pages' pool writes: then `pages`, the
    connection the caller holds, is used itself (a second one from the same
    pool, taken while holding the first, could wait forever under load).
    """
    gate = request.app.state.writer
    if gate is request.app.state.database and pages is not None:
        yield pages
        return
    with gate.connection() as conn:
        yield conn


def settings_of(request: Request) -> Settings:
    s: Settings = request.app.state.settings
    return s


def client_ip(request: Request) -> str:
    """The peer's address (behind a reverse proxy, the proxy's: rate limits then count per proxy)."""
    return request.client.host if request.client else "unknown"


# --- the user and the session ------------------------------------------------------------

@dataclass(frozen=True)
class PortalUser:
    id: int
    login: str
    email: str
    email_confirmed: bool
    phone: str | None
    session_id: int = 0


def token_hash(token: str) -> bytes:
    """Session cookies and one-time tokens are kept in the database as SHA-256 only."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def session_cookie_name(settings: Settings) -> str:
    # __Host-: only this host over HTTPS may set it, so a sibling subdomain cannot plant one
    return "__Host-amr_session" if settings.portal_secure_cookies else "amr_session"


def anon_cookie_name(settings: Settings) -> str:
    return "__Host-amr_anon" if settings.portal_secure_cookies else "amr_anon"


def set_cookie(response: Any, settings: Settings, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=settings.portal_secure_cookies,
                        httponly=True, samesite="lax")


def optional_user(request: Request) -> PortalUser | None:
    """The user of a valid session cookie, or None (looked up once per request)."""
    if hasattr(request.state, "portal_user"):
        user: PortalUser | None = request.state.portal_user
        return user
    user = None
    token = request.cookies.get(session_cookie_name(settings_of(request)))
    if token and len(token) < 200:
        with db(request) as conn:
            row = conn.execute(
                "SELECT u.id, u.login, u.email, u.email_confirmed_at IS NOT NULL, u.phone, s.id"
                " FROM portal_session s JOIN portal_user u ON u.id = s.user_id"
                " WHERE s.token_hash = %s AND s.revoked_at IS NULL AND s.expires_at > now()",
                (token_hash(token),)).fetchone()
        if row is not None:
            user = PortalUser(*row)
    request.state.portal_user = user
    return user


def require_user(request: Request) -> PortalUser:
    """The logged-in user; LoginRequired (-> /login?next=...) without a valid session."""
    user = optional_user(request)
    if user is None:
        raise LoginRequired
    return user


CurrentUser = Annotated[PortalUser, Depends(require_user)]


# --- CSRF: a token derived from the session (or the anonymous) cookie ------------------------

def _derive(cookie_value: str) -> str:
    return hashlib.sha256(b"amr-portal-csrf\0" + cookie_value.encode("utf-8")).hexdigest()


def csrf_token(request: Request) -> str:
    """The token this visitor's forms carry.

    It is a hash of the HttpOnly session cookie (or of the anonymous cookie
    given before login), which another site can neither read nor compute.
    """
    settings = settings_of(request)
    if getattr(request.state, "session_token", None):  # a session created by this request
        return _derive(request.state.session_token)
    if optional_user(request) is not None:
        return _derive(request.cookies[session_cookie_name(settings)])
    anon = request.cookies.get(anon_cookie_name(settings)) or getattr(request.state, "new_anon", None)
    if not anon or len(anon) > 200:
        anon = secrets.token_urlsafe(32)
        request.state.new_anon = anon
    return _derive(anon)


def _expected_tokens(request: Request) -> list[str]:
    """The tokens this request may carry: the session's alone while the session is valid.

    Without a valid session (none yet, or one that ended while a form was
    open) the token of the anonymous cookie, or of the stale session cookie
    the form was rendered with, lets a login or registration form through.
    """
    settings = settings_of(request)
    session = request.cookies.get(session_cookie_name(settings))
    if session and len(session) < 200 and optional_user(request) is not None:
        return [_derive(session)]
    out = []
    if session and len(session) < 200:
        out.append(_derive(session))
    anon = request.cookies.get(anon_cookie_name(settings))
    if anon and len(anon) < 200:
        out.append(_derive(anon))
    return out


async def csrf_protect(request: Request) -> None:
    """Refuse a POST whose csrf_token field does not match this visitor's cookie (403 page).

    Also refused: an Origin header naming another site than this one or
    AMR_PORTAL_BASE_URL.
    """
    origin = request.headers.get("origin")
    if origin and origin != "null":
        own = {f"{request.url.scheme}://{request.url.netloc}"}
        base = urlsplit(settings_of(request).portal_base_url)
        if base.scheme and base.netloc:
            own.add(f"{base.scheme}://{base.netloc}")
        if origin.rstrip("/") not in own:
            raise CsrfFailed
    form = await request.form()
    given = form.get("csrf_token")
    if not isinstance(given, str) or not given:
        raise CsrfFailed
    expected = await run_in_threadpool(_expected_tokens, request)  # may look the session up
    if not any(hmac.compare_digest(given, t) for t in expected):
        raise CsrfFailed


CsrfChecked = Depends(csrf_protect)


# --- rendering ----------------------------------------------------------------------------------

def render(request: Request, template_name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page from portal/templates with user, csrf_token and the pending flash messages."""
    user = optional_user(request) if "user" not in context else context.pop("user")
    token = csrf_token(request)
    flashes = _read_flashes(request)
    response = templates.TemplateResponse(
        request, template_name, {"user": user, "csrf_token": token, "flashes": flashes, **context},
        status_code=status_code)
    settings = settings_of(request)
    if getattr(request.state, "new_anon", None):
        set_cookie(response, settings, anon_cookie_name(settings), request.state.new_anon, None)
    if flashes:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def _read_flashes(request: Request) -> list[str]:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return []
    try:
        value = json.loads(base64.urlsafe_b64decode(raw.encode("ascii")).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return []
    return [str(m)[:300] for m in value if isinstance(m, str)][:5] if isinstance(value, list) else []


_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\s]*$")


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go to after login, never another site (//evil.example, /\\evil, https://...)."""
    if target and _LOCAL_PATH.match(target) and len(target) < 500:
        return target
    return default


def redirect(url: str, flash: str | None = None) -> RedirectResponse:
    """303 See Other to a local path (after a POST), with a message shown on the next page."""
    response = RedirectResponse(safe_next(url), status_code=303)
    if flash:
        data = base64.urlsafe_b64encode(json.dumps([flash], ensure_ascii=False).encode("utf-8")).decode("ascii")
        response.set_cookie(FLASH_COOKIE, data, path="/", httponly=True, samesite="lax")
    return response


def login_redirect(request: Request) -> RedirectResponse:
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(path, safe='')}", status_code=303)


# --- audit and rate limits --------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(?i)(password|passwd|token|secret|link|url|hash|answer|captcha|cookie)")


def audit(conn: psycopg.Connection, user_id: int | None, action: str, detail: Mapping[str, Any] | None = None,
          request: Request | None = None) -> None:
    """One row of the audit log (logins, links, readings, payments); never a secret.

    Keys naming secrets are dropped rather than masked: the log is evidence
    of who did what, and a password or link in it would be a leak.
    """
    clean = {k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
             for k, v in (detail or {}).items() if not _SECRET_KEY.search(k)}
    ip = client_ip(request) if request is not None else None
    conn.execute("SELECT portal_audit(%s, %s, %s, %s)", (user_id, action, Jsonb(clean), ip))


def rate_limit(conn: psycopg.Connection, key: str, limit: int, window_s: int) -> None:
    """Count one attempt under `key`; RateLimited when the current window holds more than `limit`.

    Fixed windows in portal_rate_counter, counted by the function
    portal_rate_hit in one statement, so concurrent processes agree.
    The count is committed at once (with whatever the caller's transaction did
    before: call it first), so a refused attempt still counts when the request
    fails afterwards.
    """
    hits, retry = conn.execute("SELECT * FROM portal_rate_hit(%s, %s)", (key, window_s)).fetchone() or (0, 0)
    conn.commit()
    if hits > limit:
        raise RateLimited(int(retry))


def rate_hit(conn: psycopg.Connection, key: str, window_s: int) -> int:
    """Count one attempt under `key` (committed at once) and return the window's count; never raises."""
    row = conn.execute("SELECT * FROM portal_rate_hit(%s, %s)", (key, window_s)).fetchone()
    conn.commit()
    return int(row[0]) if row else 0


def rate_exceeded(conn: psycopg.Connection, key: str, limit: int, window_s: int) -> int | None:
    """Seconds until `key` may try again when its window already holds `limit` attempts, else None."""
    row = conn.execute("SELECT * FROM portal_rate_peek(%s, %s)", (key, window_s)).fetchone()
    if row is None or row[0] < limit:
        return None
    return int(row[1])


def rate_clear(conn: psycopg.Connection, key: str) -> None:
    """Forget the attempts under `key` (a login that succeeded clears its failures)."""
    conn.execute("SELECT portal_rate_clear(%s)", (key,))


def rate_check(conn: psycopg.Connection, key: str, limit: int, window_s: int) -> None:
    """RateLimited when `key` already used up its window, without counting this attempt."""
    retry = rate_exceeded(conn, key, limit, window_s)
    if retry is not None:
        raise RateLimited(retry)
