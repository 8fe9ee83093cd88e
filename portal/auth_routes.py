"""Registration, e-mail confirmation, login, logout, password recovery and the profile.

Plain HTML forms (no JavaScript), each POST checked by `web.csrf_protect`.
What a failure says never tells whether a login or an address exists: a
wrong password and an unknown login get one message, a recovery request one
answer. Links in e-mails carry a one-time token; opening one shows a page with
a button (a POST), so a mail scanner that follows links does not use it up.
Nothing here logs a password, a token or a link; the audit log records the
action, the user's id and the address.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Form as F
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from portal import captcha, mail, users, web
from portal.web import CsrfChecked, CurrentUser, client_ip, db, render

log = logging.getLogger("amr.portal.auth")
router = APIRouter()

Field = Annotated[str, F()]

REGISTER_PER_IP = (10, 3600)
CAPTCHAS_PER_IP = (100, 600)       # registration forms shown
RESET_PER_IP = (10, 3600)
RESET_PER_NAME = (3, 3600)
RESEND_PER_USER = (3, 3600)
PROFILE_PASSWORD = (10, 15 * 60)   # wrong current passwords on the profile forms

SENT_RESET = ("Если такой логин или адрес зарегистрирован, на его электронную почту отправлена "
              "ссылка для восстановления пароля.")
BAD_LOGIN = "Неверный логин или пароль."
TOKEN_TROUBLE = {
    "used": "Эта ссылка уже использована.",
    "expired": "Срок действия ссылки истёк.",
    "unknown": "Ссылка недействительна.",
}


def _send(request: Request, user_id: int, to: str, letter: tuple[str, str]) -> bool:
    """Send a letter; False (logged by user id, never the link) when it could not go."""
    settings = web.settings_of(request)
    try:
        mail.send(settings, to, *letter)
    except (mail.MailNotConfigured, mail.MailFailed) as exc:
        log.warning("letter to user %d not sent: %s", user_id, exc)
        return False
    log.info("letter '%s' sent to user %d", letter[0], user_id)
    return True


def _with_session(response: Response, request: Request, token: str, max_age: int | None) -> Response:
    settings = web.settings_of(request)
    web.set_cookie(response, settings, web.session_cookie_name(settings), token, max_age)
    return response


# --- registration -------------------------------------------------------------------------------

def _register_form(request: Request, problems: list[str], values: dict[str, str], status: int = 200) -> HTMLResponse:
    with db(request) as conn:
        web.rate_limit(conn, f"captcha-ip:{client_ip(request)}", *CAPTCHAS_PER_IP)  # each one is a row
        challenge = captcha.new_challenge(conn, request.app.state.captcha_text)
    return render(request, "register.html", status_code=status, problems=problems, values=values,
                  captcha=challenge, licence_version=users.LICENCE_VERSION,
                  pd_version=users.PD_CONSENT_VERSION)


@router.get("/register", response_class=HTMLResponse)
def register_page(request: Request) -> Response:
    if web.optional_user(request) is not None:
        return web.redirect("/profile")
    return _register_form(request, [], {})


@router.post("/register", dependencies=[CsrfChecked])
def register(request: Request, login: Field = "", password: Field = "", password2: Field = "",
             email: Field = "", phone: Field = "", licence: Field = "", pd_consent: Field = "",
             captcha_id: Field = "", captcha_answer: Field = "") -> Response:
    login, email = login.strip(), email.strip()
    values = {"login": login, "email": email, "phone": phone.strip()}
    with db(request) as conn:
        web.rate_limit(conn, f"register-ip:{client_ip(request)}", *REGISTER_PER_IP)
        human = captcha.solved(conn, captcha_id, captcha_answer)  # used up, right or wrong
        problems, normal_phone = users.registration_problems(
            login, password, password2, email, phone, licence == "1", pd_consent == "1")
        if not human:
            problems.insert(0, "Символы с картинки введены неверно. Введите символы с новой картинки.")
        user_id = None
        if not problems:
            user_id = users.create_user(conn, login, password, email, normal_phone)
            if user_id is None:
                problems.append("Этот логин уже занят. Выберите другой.")
        if user_id is None:
            conn.commit()  # the used captcha stays used
        else:
            token = users.issue_token(conn, "confirm_email", user_id, email)
            session, max_age = users.start_session(conn, user_id, False, client_ip(request),
                                                   request.headers.get("user-agent", ""))
            web.audit(conn, user_id, "register", {"licence_version": users.LICENCE_VERSION,
                                                  "pd_consent_version": users.PD_CONSENT_VERSION}, request)
    if user_id is None:
        return _register_form(request, problems, values, 400)
    sent = _send(request, user_id, email, mail.confirmation_letter(
        login, mail.link(web.settings_of(request), f"/confirm?t={token}"), users.CONFIRM_HOURS))
    note = (f"Регистрация завершена. На адрес {email} отправлено письмо со ссылкой для подтверждения."
            if sent else "Регистрация завершена, но письмо для подтверждения адреса отправить не удалось. "
            "Попробуйте отправить его ещё раз из профиля позже.")
    return _with_session(web.redirect("/profile", note), request, session, max_age)


# --- e-mail confirmation --------------------------------------------------------------------------

@router.get("/confirm", response_class=HTMLResponse)
def confirm_page(request: Request, t: str = "") -> Response:
    with db(request) as conn:
        state = users.token_state(conn, "confirm_email", t)
    if state != "ok":
        raise web.PortalError(400, "Подтверждение адреса", TOKEN_TROUBLE[state] +
                              " Письмо можно отправить ещё раз из профиля.")
    return render(request, "confirm.html", token=t)


@router.post("/confirm", dependencies=[CsrfChecked])
def confirm(request: Request, t: Field = "") -> Response:
    with db(request) as conn:
        state, user_id = users.use_token(conn, "confirm_email", t)
        web.audit(conn, user_id, "email_confirm", {"outcome": state}, request)
    if state != "ok":
        raise web.PortalError(400, "Подтверждение адреса", TOKEN_TROUBLE[state] +
                              " Письмо можно отправить ещё раз из профиля.")
    return web.redirect("/profile" if web.optional_user(request) else "/login",
                        "Адрес электронной почты подтверждён.")


# --- login and logout ---------------------------------------------------------------------------------

def _who(name: str) -> str:
    """A typed login or address as a counter's key: hashed, since people type passwords there too."""
    return hashlib.sha256(name.lower().encode("utf-8")).hexdigest()[:32]


def _login_keys(login: str, ip: str) -> list[tuple[str, int, int]]:
    return [(f"{prefix}:{_who(login) if prefix == 'login' else ip}", limit, window)
            for prefix, limit, window in users.LOGIN_LIMITS]


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> Response:
    return render(request, "login.html", next=web.safe_next(next), error=None, login="")


@router.post("/login", dependencies=[CsrfChecked])
def login(request: Request, login: Field = "", password: Field = "", remember: Field = "",
          next: Field = "/") -> Response:
    name = login.strip().lower()[:64]
    ip = client_ip(request)
    keys = _login_keys(name, ip)
    blocked: int | None = None
    session: str | None = None
    max_age: int | None = None
    with db(request) as conn:
        waits = [w for key, limit, window in keys if (w := web.rate_exceeded(conn, key, limit, window))]
        if waits:
            blocked = max(waits)
            web.audit(conn, None, "login_throttled", {}, request)
        else:
            account = users.by_login(conn, name) if name else None
            if users.password_matches(account.password_hash if account else None, password):
                assert account is not None
                web.rate_clear(conn, keys[0][0])
                web.rate_clear(conn, keys[1][0])
                old = request.cookies.get(web.session_cookie_name(web.settings_of(request)))
                if old:
                    users.end_session(conn, old)
                session, max_age = users.start_session(conn, account.id, remember == "1", ip,
                                                       request.headers.get("user-agent", ""))
                web.audit(conn, account.id, "login", {"remember": remember == "1"}, request)
            else:
                # the login typed is recorded only when it exists: people type passwords there
                web.audit(conn, account.id if account else None, "login_failed", {}, request)
                for key, _limit, window in keys:
                    web.rate_hit(conn, key, window)
    if blocked is not None:
        raise web.RateLimited(blocked)
    if session is None:
        return render(request, "login.html", status_code=401, next=web.safe_next(next), error=BAD_LOGIN,
                      login=login.strip()[:64])
    log.info("login from %s", ip)
    return _with_session(web.redirect(web.safe_next(next)), request, session, max_age)


def _logged_out(request: Request, flash: str) -> RedirectResponse:
    response = web.redirect("/login", flash)
    settings = web.settings_of(request)
    response.delete_cookie(web.session_cookie_name(settings), path="/", secure=settings.portal_secure_cookies,
                           httponly=True, samesite="lax")
    return response


@router.post("/logout", dependencies=[CsrfChecked])
def logout(request: Request) -> Response:
    token = request.cookies.get(web.session_cookie_name(web.settings_of(request)))
    user = web.optional_user(request)
    with db(request) as conn:
        if token:
            users.end_session(conn, token)
        if user is not None:
            web.audit(conn, user.id, "logout", {}, request)
    return _logged_out(request, "Вы вышли из личного кабинета.")


@router.post("/logout-all", dependencies=[CsrfChecked])
def logout_everywhere(request: Request, user: CurrentUser) -> Response:
    with db(request) as conn:
        n = users.end_all_sessions(conn, user.id)
        web.audit(conn, user.id, "logout_all", {"sessions": n}, request)
    return _logged_out(request, "Вы вышли из личного кабинета на всех устройствах.")


# --- password recovery -------------------------------------------------------------------------------

@router.get("/reset", response_class=HTMLResponse)
def reset_page(request: Request) -> Response:
    return render(request, "reset_request.html")


@router.post("/reset", dependencies=[CsrfChecked])
def reset_request(request: Request, name: Field = "") -> Response:
    name = name.strip()[:254]
    letters = []
    with db(request) as conn:
        web.rate_limit(conn, f"reset-ip:{client_ip(request)}", *RESET_PER_IP)
        if name:
            web.rate_limit(conn, f"reset:{_who(name)}", *RESET_PER_NAME)
            for account in users.by_login_or_email(conn, name):
                token = users.issue_token(conn, "reset_password", account.id, account.email)
                web.audit(conn, account.id, "password_reset_requested", {}, request)
                letters.append((account, token))
    for account, token in letters:
        _send(request, account.id, account.email, mail.reset_letter(
            account.login, mail.link(web.settings_of(request), f"/reset/new?t={token}"), users.RESET_MINUTES))
    return web.redirect("/login", SENT_RESET)


@router.get("/reset/new", response_class=HTMLResponse)
def reset_new_page(request: Request, t: str = "") -> Response:
    with db(request) as conn:
        state = users.token_state(conn, "reset_password", t)
    if state != "ok":
        raise web.PortalError(400, "Восстановление пароля", TOKEN_TROUBLE[state] +
                              " Запросите восстановление ещё раз.")
    return render(request, "reset_new.html", token=t, problem=None)


@router.post("/reset/new", dependencies=[CsrfChecked])
def reset_new(request: Request, t: Field = "", password: Field = "", password2: Field = "") -> Response:
    problem = users.password_problem(password, "") or (None if password == password2 else "Пароли не совпадают.")
    if problem:
        return render(request, "reset_new.html", status_code=400, token=t, problem=problem)
    with db(request) as conn:
        state, user_id = users.use_token(conn, "reset_password", t)
        if state == "ok" and user_id is not None:
            users.set_password(conn, user_id, password)  # every session ends
        web.audit(conn, user_id, "password_reset", {"outcome": state}, request)
    if state != "ok":
        raise web.PortalError(400, "Восстановление пароля", TOKEN_TROUBLE[state] +
                              " Запросите восстановление ещё раз.")
    return _logged_out(request, "Пароль изменён. Войдите с новым паролем.")


# --- the profile ----------------------------------------------------------------------------------------

def _profile(request: Request, user: web.PortalUser, problems: list[str] | None = None,
             status: int = 200) -> HTMLResponse:
    return render(request, "profile.html", status_code=status, problems=problems or [],
                  mail_configured=bool(web.settings_of(request).smtp_url))


@router.get("/profile", response_class=HTMLResponse)
def profile(request: Request, user: CurrentUser) -> Response:
    return _profile(request, user)


@router.post("/profile/resend", dependencies=[CsrfChecked])
def resend(request: Request, user: CurrentUser) -> Response:
    if user.email_confirmed:
        return web.redirect("/profile", "Адрес электронной почты уже подтверждён.")
    with db(request) as conn:
        web.rate_limit(conn, f"resend:user:{user.id}", *RESEND_PER_USER)
        token = users.issue_token(conn, "confirm_email", user.id, user.email)
        web.audit(conn, user.id, "email_confirm_resent", {}, request)
    sent = _send(request, user.id, user.email, mail.confirmation_letter(
        user.login, mail.link(web.settings_of(request), f"/confirm?t={token}"), users.CONFIRM_HOURS))
    return web.redirect("/profile", f"Письмо со ссылкой отправлено на {user.email}." if sent
                        else "Письмо отправить не удалось, попробуйте позже.")


def _current_password_ok(request: Request, user: web.PortalUser, password: str) -> bool:
    with db(request) as conn:
        web.rate_check(conn, f"profile-pw:user:{user.id}", *PROFILE_PASSWORD)
        account = users.by_id(conn, user.id)
        ok = users.password_matches(account.password_hash if account else None, password)
        if not ok:
            web.rate_hit(conn, f"profile-pw:user:{user.id}", PROFILE_PASSWORD[1])
    return ok


@router.post("/profile/email", dependencies=[CsrfChecked])
def change_email(request: Request, user: CurrentUser, email: Field = "", password: Field = "") -> Response:
    email = email.strip()
    if problem := users.email_problem(email):
        return _profile(request, user, [problem], 400)
    if not _current_password_ok(request, user, password):
        return _profile(request, user, ["Текущий пароль введён неверно."], 400)
    if email == user.email:
        return web.redirect("/profile", "Адрес не изменился.")
    with db(request) as conn:
        conn.execute("SELECT portal_user_set_email(%s, %s)", (user.id, email))
        token = users.issue_token(conn, "confirm_email", user.id, email)
        web.audit(conn, user.id, "email_changed", {}, request)
    sent = _send(request, user.id, email, mail.confirmation_letter(
        user.login, mail.link(web.settings_of(request), f"/confirm?t={token}"), users.CONFIRM_HOURS))
    return web.redirect("/profile", "Адрес изменён. " + (
        f"Подтвердите его по ссылке из письма, отправленного на {email}." if sent
        else "Письмо для подтверждения отправить не удалось, попробуйте ещё раз позже."))


@router.post("/profile/phone", dependencies=[CsrfChecked])
def change_phone(request: Request, user: CurrentUser, phone: Field = "") -> Response:
    try:
        normal = users.normalize_phone(phone)
    except ValueError as exc:
        return _profile(request, user, [f"Телефон: {exc}."], 400)
    with db(request) as conn:
        conn.execute("SELECT portal_user_set_phone(%s, %s)", (user.id, normal))
        web.audit(conn, user.id, "phone_changed", {}, request)
    return web.redirect("/profile", "Телефон сохранён." if normal else "Телефон удалён.")


@router.post("/profile/password", dependencies=[CsrfChecked])
def change_password(request: Request, user: CurrentUser, current: Field = "", password: Field = "",
                    password2: Field = "") -> Response:
    problem = users.password_problem(password, user.login) or (
        None if password == password2 else "Пароли не совпадают.")
    if problem:
        return _profile(request, user, [problem], 400)
    if not _current_password_ok(request, user, current):
        return _profile(request, user, ["Текущий пароль введён неверно."], 400)
    with db(request) as conn:
        users.set_password(conn, user.id, password)  # every session ends, this one too
        session, max_age = users.start_session(conn, user.id, False, client_ip(request),
                                               request.headers.get("user-agent", ""))
        web.audit(conn, user.id, "password_changed", {}, request)
    return _with_session(web.redirect("/profile", "Пароль изменён. На других устройствах выполнен выход."),
                         request, session, max_age)


# --- the texts a user accepts ------------------------------------------------------------------------------

@router.get("/terms", response_class=HTMLResponse)
def terms(request: Request) -> Response:
    return render(request, "terms.html", version=users.LICENCE_VERSION)


@router.get("/privacy", response_class=HTMLResponse)
def privacy(request: Request) -> Response:
    return render(request, "privacy.html", version=users.PD_CONSENT_VERSION)
