"""The customer account as one FastAPI application: `create_app(settings)`.

Routers: portal.auth_routes (registration, e-mail confirmation, login, logout,
password recovery, profile, captcha images) and portal.account_routes (the
linked accounts' pages, including "/", the list of the user's accounts). What
they share is in portal.web. The static files (portal/static) are served at
/static; nothing comes from the internet and no page needs JavaScript.

Every response carries a Content-Security-Policy that allows only this site's
own resources (a form may lead to this site and to the card payment
provider only), refuses framing, and sends no Referer to other sites (the
confirmation and reset links are in URLs). A database that is down is a 503
page in Russian, not a traceback.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from amr.settings import Settings, get_settings
from billing.api import DatabaseGate, DatabaseUnavailable
from portal import web

log = logging.getLogger("amr.portal")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def security_headers_for(settings: Settings) -> dict[str, str]:
    """SECURITY_HEADERS with the card payment provider's origin allowed as a form's destination.

    The payment form posts to the account, which answers 303 to the provider's
    payment page; browsers hold a form's redirects to form-action too, so with
    'self' alone Chromium stops the customer on the form (nothing happens on
    "Перейти к оплате").
    """
    headers = dict(SECURITY_HEADERS)
    url = urllib.parse.urlsplit(settings.payment_provider_url)
    if url.scheme in ("http", "https") and url.netloc:
        headers["Content-Security-Policy"] = headers["Content-Security-Policy"].replace(
            "form-action 'self'", f"form-action 'self' {url.scheme}://{url.netloc}")
    return headers


class LinkTokenFilter(logging.Filter):
    """Masks the one-time token of a confirmation or reset link (`?t=...`) in uvicorn's access log.

    Those links are GET requests (they come from e-mails); the access log would
    otherwise write the token of every link opened, and the token is the key.
    """

    TOKEN = re.compile(r"([?&]t=)[^&\s]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.TOKEN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.TOKEN.sub(r"\1***", record.msg)
        return True


def _install_token_filter() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, LinkTokenFilter) for f in access.filters):
        access.addFilter(LinkTokenFilter())


async def _page(request: Request, status: int, title: str, message: str, *, with_user: bool = True) -> HTMLResponse:
    """The error page, rendered in a worker thread (it may look the session up in the database)."""
    return await run_in_threadpool(_render_page, request, status, title, message, with_user)


def _render_page(request: Request, status: int, title: str, message: str, with_user: bool) -> HTMLResponse:
    context: dict[str, Any] = {"title": title, "message": message}
    if not with_user:
        context["user"] = None
    try:
        response = web.render(request, "error.html", status_code=status, **context)
    except DatabaseUnavailable:  # the user could not be looked up: the page without them
        context["user"] = None
        response = web.render(request, "error.html", status_code=status, **context)
    return response


async def portal_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, web.PortalError)
    response = await _page(request, exc.status, exc.title, exc.message)
    if isinstance(exc, web.RateLimited):
        response.headers["Retry-After"] = str(max(1, exc.retry_after_s))
    return response


async def login_required(request: Request, exc: Exception) -> Response:
    if request.method in ("GET", "HEAD"):
        return web.login_redirect(request)
    return await _page(request, 401, "Нужно войти", "Войдите в личный кабинет и повторите действие.",
                 with_user=False)


async def database_unavailable(request: Request, exc: Exception) -> Response:
    return await _page(request, 503, "Сервис временно недоступен",
                 "Личный кабинет временно недоступен. Попробуйте через несколько минут.", with_user=False)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err = web.not_found()
        return await _page(request, 404, err.title, err.message)
    if exc.status_code == 405:
        return await _page(request, 405, "Действие недоступно", "Так эту страницу открыть нельзя.")
    return await _page(request, exc.status_code, "Ошибка", "Запрос не выполнен.")


async def invalid_request(request: Request, exc: Exception) -> Response:
    return await _page(request, 422, "Неверные данные", "Форма заполнена неверно: проверьте поля и отправьте её ещё раз.")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    gates: list[DatabaseGate] = [app.state.database]
    if app.state.writer is not app.state.database:
        gates.append(app.state.writer)
    for gate in gates:
        gate.open()
    try:
        yield
    finally:
        for gate in gates:
            gate.close()


def create_app(settings: Settings | None = None, *, captcha_text: Callable[[], str] | None = None) -> FastAPI:
    """The customer account bound to one database and one mail server.

    `captcha_text` makes the captcha's answers (default: random, from
    portal.captcha): a test passes its own to know the answer it must type;
    the answer is checked the same way whoever chose it.
    """
    settings = settings or get_settings()
    app = FastAPI(title="Личный кабинет", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.database = DatabaseGate(settings.database_url, settings.api_db_wait_s)
    # readings and card payments are written with a role of their own (AMR_PORTAL_WRITER_URL): the
    # pages' role reads views and calls narrow functions only (migrations 011, 020, 021)
    app.state.writer = (DatabaseGate(settings.portal_writer_url, settings.api_db_wait_s)
                        if settings.portal_writer_url else app.state.database)
    app.state.captcha_text = captcha_text
    _install_token_filter()
    try:  # the formatting filters (money, dates, zones), one home: portal/formatting.py
        from portal.formatting import FILTERS

        web.templates.env.filters.update(FILTERS)
    except ImportError:  # pragma: no cover - only while the account pages are being built
        log.debug("portal.formatting not available: no formatting filters")

    from portal import account_routes, auth_routes

    app.include_router(auth_routes.router)
    app.include_router(account_routes.router)
    app.mount("/static", StaticFiles(directory=str(web.HERE / "static")), name="static")
    app.add_exception_handler(web.PortalError, portal_error)
    app.add_exception_handler(web.LoginRequired, login_required)
    app.add_exception_handler(DatabaseUnavailable, database_unavailable)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)

    headers = security_headers_for(settings)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for name, value in headers.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app
