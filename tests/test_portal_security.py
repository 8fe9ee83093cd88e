"""The customer account's defences over real HTTP: CSRF, throttling, secrets in logs, rights, cookies.

Same setting as tests/test_portal_auth.py: uvicorn on a free port, the test's
own database reached as a member of amr_portal, aiosmtpd for the letters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import free_port
from tests.portal_kit import (
    PASSWORD,
    MailServer,
    Portal,
    Visitor,
    confirm,
    drop_role,
    forms,
    link_in,
    restricted_url,
)

REFUSED = "Форма устарела или отправлена не с этого сайта."
THROTTLED = re.compile(r"Слишком много попыток, попробуйте через \d+ мин\.")


@pytest.fixture
def restricted(pg_admin_url: str, db_url: str) -> Iterator[str]:
    url, role = restricted_url(pg_admin_url, db_url)
    yield url
    drop_role(pg_admin_url, role)


@pytest.fixture
def portal(restricted: str, mail: MailServer) -> Iterator[Portal]:
    p = Portal(restricted, mail)
    yield p
    p.close()


def _user(portal: Portal, mail: MailServer, login: str = "ivanov") -> tuple[Visitor, str]:
    v = portal.visitor()
    to = f"{login}@example.ru"
    assert v.register(login, to).status_code == 200
    return v, link_in(mail.wait_for(to))


def _every_post_form(portal: Portal, mail: MailServer) -> tuple[Visitor, list[tuple[str, dict[str, str]]]]:
    """A logged-in visitor and every POST form of the pages it and a stranger can open."""
    v, confirm_link = _user(portal, mail)
    anon = portal.visitor()
    anon.submit("/reset", "/reset", name="ivanov")
    reset_link = link_in(mail.wait_for("ivanov@example.ru"))
    found: list[tuple[str, dict[str, str]]] = []
    for who, path in ((anon, "/login"), (anon, "/register"), (anon, "/reset"),
                      (anon, confirm_link.removeprefix(portal.base)), (anon, reset_link.removeprefix(portal.base)),
                      (v, "/profile")):
        page = who.get(path)
        assert page.status_code == 200, path
        found += [(f["action"], f["fields"]) for f in forms(page.text) if f["method"] == "post"]
    actions = {a for a, _ in found}
    assert actions == {"/login", "/register", "/reset", "/confirm", "/reset/new", "/logout",
                       "/profile/resend", "/profile/email", "/profile/phone", "/profile/password",
                       "/logout-all"}
    return v, found


def test_forged_or_missing_csrf_token_refused_on_every_form(portal: Portal, mail: MailServer) -> None:
    v, found = _every_post_form(portal, mail)
    attacker = portal.visitor()
    attacker.get("/login")
    their_token = attacker.form("/login", "/login")["csrf_token"]  # valid, but for another session
    for action, fields in found:
        for token in (None, "", "0" * 64, their_token):
            data = {k: val for k, val in fields.items() if k != "csrf_token"}
            if token is not None:
                data["csrf_token"] = token
            data.update(password=PASSWORD, current=PASSWORD, password2=PASSWORD)
            r = v.post(action, data)
            assert r.status_code == 403, (action, token, r.status_code)
            assert REFUSED in r.text and '<html lang="ru">' in r.text
    # a token from before login (the anonymous cookie's) does not pass once a session is open
    w = portal.visitor()
    before = w.form("/login", "/login")["csrf_token"]
    assert w.login("ivanov").status_code == 303
    assert w.post("/logout-all", {"csrf_token": before}).status_code == 403
    assert w.get("/profile").status_code == 200
    # the right token from another site's page is refused too (Origin)
    fields = dict(next(f for a, f in found if a == "/logout-all"))
    v.http.headers["Origin"] = "https://evil.example"
    assert v.post("/logout-all", fields).status_code == 403
    del v.http.headers["Origin"]
    assert v.get("/profile").status_code == 200  # nothing of that logged the user out
    assert v.post("/logout-all", fields).status_code == 303  # and the real form works


def test_brute_force_on_login_throttled_per_login(portal: Portal, mail: MailServer, restricted: str,
                                                  conn: psycopg.Connection) -> None:
    _user(portal, mail)
    for _ in range(5):
        assert portal.visitor().login("ivanov", "guess guess").status_code == 401
    keys = " ".join(r[0] for r in conn.execute("SELECT key FROM portal_rate_counter").fetchall())
    assert "login:" in keys and "ivanov" not in keys  # what was typed is kept hashed
    blocked = portal.visitor().login("ivanov")  # even the right password, while locked
    assert blocked.status_code == 429 and THROTTLED.search(blocked.text)
    assert 0 < int(blocked.headers["Retry-After"]) <= 15 * 60
    other = Portal(restricted, mail)  # another portal process on the same database agrees
    try:
        assert other.visitor().login("IVANOV").status_code == 429
    finally:
        other.close()
    # other logins from the same address are not locked by this one
    assert portal.visitor().login("petrov", "guess guess").status_code == 401


def test_brute_force_on_login_throttled_per_address(portal: Portal, mail: MailServer,
                                                    conn: psycopg.Connection) -> None:
    _user(portal, mail)
    # 28 failures from this address already counted (each real one costs an argon2 check, ~0.5 s here)
    for _ in range(28):
        conn.execute("SELECT portal_rate_hit('login-ip:127.0.0.1', 900)")
    conn.commit()
    for i in range(2):  # the 29th and 30th, each on a login never tried before
        assert portal.visitor().login(f"nobody{i}", "guess guess").status_code == 401
    r = portal.visitor().login("ivanov")
    assert r.status_code == 429 and THROTTLED.search(r.text)


def test_registration_and_recovery_throttled(portal: Portal, mail: MailServer) -> None:
    v = portal.visitor()
    codes = [v.register(f"user{i}", f"user{i}@example.ru", captcha_answer="WRONG").status_code
             for i in range(11)]
    assert codes[:10] == [400] * 10 and codes[10] == 429
    anon = portal.visitor()
    codes = [anon.submit("/reset", "/reset", follow=False, name="someone").status_code for _ in range(4)]
    assert codes == [303, 303, 303, 429]


def test_no_password_or_token_in_any_log_line(portal: Portal, mail: MailServer,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    v, confirm_link = _user(portal, mail)
    confirm(v, confirm_link)
    anon = portal.visitor()
    anon.submit("/reset", "/reset", name="ivanov@example.ru")
    reset_link = link_in(mail.wait_for("ivanov@example.ru"))
    path = reset_link.removeprefix(portal.base)
    anon.submit(path, "/reset/new", password="brand new secret 1", password2="brand new secret 1")
    in_ = portal.visitor()
    in_.login("ivanov", "brand new secret 1", remember=True)
    in_.login("ivanov", "wrong secret guess")
    secrets = [PASSWORD, "brand new secret 1", "wrong secret guess",
               confirm_link.split("t=", 1)[1], reset_link.split("t=", 1)[1],
               *(c for c in (in_.http.cookies.get("amr_session"), v.http.cookies.get("amr_session")) if c)]
    # every record of this process but the test's own HTTP client and SMTP server (they carry the links)
    ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore", "mail.log"))]
    assert {r.name for r in ours} >= {"uvicorn.access", "amr.portal.auth"}
    lines = [r.getMessage() + " " + " ".join(f"{k}={val}" for k, val in vars(r).items()) for r in ours]
    assert any("/confirm?t=***" in line for line in lines), "the access log was not captured"
    for line in lines:
        for s in secrets:
            assert s not in line, f"a secret in the log: {line[:200]}"


def test_the_portal_role_reads_and_writes_only_through_functions(restricted: str, pg_admin_url: str,
                                                                 db_url: str) -> None:
    with psycopg.connect(restricted, autocommit=True) as c:
        for sql in ("INSERT INTO portal_user (login, password_hash, email, licence_version, licence_accepted_at,"
                    " pd_consent_version, pd_consent_at) VALUES ('x', '$argon2id$x', 'x@y.z', '1', now(), '1', now())",
                    "UPDATE portal_token SET used_at = NULL", "DELETE FROM portal_session",
                    "SELECT * FROM portal_captcha", "SELECT * FROM portal_audit_log",
                    "DELETE FROM portal_audit_log", "DELETE FROM portal_rate_counter"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)
        c.execute("SELECT count(*) FROM portal_user")  # what the pages read, it may
    outsider, role = restricted_url(pg_admin_url, db_url)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"REVOKE amr_portal FROM {role}")
    try:
        with psycopg.connect(outsider, autocommit=True) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT portal_rate_clear('login:ivanov')")  # not executable by PUBLIC
    finally:
        drop_role(pg_admin_url, role)


def test_cookies_secure_and_headers(restricted: str, mail: MailServer) -> None:
    p = Portal(restricted, mail, portal_secure_cookies=True)
    try:
        r = p.visitor().get("/register")
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("__Host-amr_anon=")
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    finally:
        p.close()


def test_login_goes_only_to_local_pages(portal: Portal, mail: MailServer) -> None:
    _user(portal, mail)
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example", "/"), ("/\\evil", "/"),
                             ("/profile", "/profile")):
        v = portal.visitor()
        fields = v.form("/login?next=" + target.replace("/", "%2F"), "/login")
        fields.update(login="ivanov", password=PASSWORD, next=target)
        r = v.post("/login", fields)
        assert r.status_code == 303 and r.headers["location"] == expected, target
    assert portal.visitor().get("/profile").headers["location"] == "/login?next=%2Fprofile"


def test_database_down_is_a_page_in_russian(mail: MailServer) -> None:
    p = Portal(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", mail, api_db_wait_s=0.5)
    try:
        r = p.visitor().get("/register")
        assert r.status_code == 503 and "Личный кабинет временно недоступен" in r.text
    finally:
        p.close()
