"""The customer account's identity pages over real HTTP, with a real SMTP server and PostgreSQL.

The portal runs under uvicorn on a free port, connected to the test's own
database as a login role that is only a member of amr_portal (so every write
goes through migration 020's functions, as in production); the letters go to
aiosmtpd on 127.0.0.1 and the tests follow the links they carry. The client
is httpx without JavaScript, filling the forms found in the pages.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from portal.mail import MailNotConfigured, parse_smtp_url
from tests.conftest import free_port
from tests.daemons import Daemon
from tests.portal_kit import (
    CAPTCHA,
    PASSWORD,
    MailServer,
    Portal,
    body,
    confirm,
    drop_role,
    forms,
    link_in,
    restricted_url,
)


@pytest.fixture
def portal(pg_admin_url: str, db_url: str, mail: MailServer) -> Iterator[Portal]:
    url, role = restricted_url(pg_admin_url, db_url)
    p = Portal(url, mail)
    yield p
    p.close()
    drop_role(pg_admin_url, role)


def _without_csrf(page: str) -> str:
    """A page with its visitor's own CSRF token blanked: what two visitors may compare."""
    return re.sub(r'name="csrf_token" value="[^"]*"', 'name="csrf_token" value=""', page)


def _registered(portal: Portal, mail: MailServer, login: str = "ivanov", to: str = "ivanov@example.ru"):
    v = portal.visitor()
    page = v.register(login, to)
    assert page.status_code == 200, page.text[:500]
    return v, mail.wait_for(to)


def test_register_confirm_login(portal: Portal, mail: MailServer, conn: psycopg.Connection) -> None:
    v, letter = _registered(portal, mail)
    assert "Email не подтвержден" in v.get("/profile").text
    assert letter["Subject"] == "Подтверждение адреса электронной почты"
    link = link_in(letter)
    assert link.startswith(portal.base + "/confirm?t=")
    assert "Здравствуйте, ivanov!" in body(letter)

    done = confirm(v, link)
    assert "Адрес электронной почты подтверждён." in done.text
    assert "Email не подтвержден" not in done.text

    v.submit("/profile", "/logout")
    assert v.get("/profile").status_code == 303
    other = portal.visitor()
    ok = other.login("IVANOV")  # a login is one whatever its case
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    profile = other.get("/profile")
    assert profile.status_code == 200 and "ivanov@example.ru" in profile.text and "подтверждён" in profile.text

    row = conn.execute("SELECT password_hash, licence_version, licence_accepted_at, pd_consent_version,"
                       " pd_consent_at, email_confirmed_at FROM portal_user WHERE login = 'ivanov'").fetchone()
    assert row[0].startswith("$argon2id$") and PASSWORD not in row[0]
    assert row[1] and row[2] and row[3] and row[4] and row[5]  # both consents, versioned and dated
    cookie = other.http.cookies["amr_session"]
    hashes = [bytes(r[0]) for r in conn.execute("SELECT token_hash FROM portal_session").fetchall()]
    assert hashlib.sha256(cookie.encode()).digest() in hashes  # stored hashed, never as given
    actions = [r[0] for r in conn.execute("SELECT action FROM portal_audit_log ORDER BY id").fetchall()]
    assert actions[:2] == ["register", "email_confirm"] and "login" in actions and "logout" in actions


def test_replayed_confirmation_link_refused(portal: Portal, mail: MailServer) -> None:
    v, letter = _registered(portal, mail)
    link = link_in(letter)
    fields = v.form(link.removeprefix(portal.base), "/confirm")
    assert v.post("/confirm", fields).status_code == 303
    again = v.post("/confirm", fields)
    assert again.status_code == 400 and "Эта ссылка уже использована." in again.text
    assert v.get(link.removeprefix(portal.base)).status_code == 400


def test_expired_confirmation_link_refused(portal: Portal, mail: MailServer, conn: psycopg.Connection) -> None:
    v, letter = _registered(portal, mail)
    conn.execute("UPDATE portal_token SET expires_at = now() - interval '1 second'")
    conn.commit()
    page = v.get(link_in(letter).removeprefix(portal.base))
    assert page.status_code == 400 and "Срок действия ссылки истёк." in page.text
    assert "Email не подтвержден" in v.get("/profile").text


def test_resend_from_the_profile(portal: Portal, mail: MailServer) -> None:
    v, first = _registered(portal, mail)
    page = v.submit("/profile", "/profile/resend")
    assert "Письмо со ссылкой отправлено на ivanov@example.ru." in page.text
    second = mail.wait_for("ivanov@example.ru")
    assert link_in(second) != link_in(first)
    assert "Адрес электронной почты подтверждён." in confirm(v, link_in(second)).text


def test_password_reset_by_email_single_use(portal: Portal, mail: MailServer) -> None:
    v, _ = _registered(portal, mail)
    anon = portal.visitor()
    page = anon.submit("/reset", "/reset", name="IVANOV@example.ru")
    assert "ссылка для восстановления пароля" in page.text
    letter = mail.wait_for("ivanov@example.ru")
    assert letter["Subject"] == "Восстановление пароля"
    path = link_in(letter).removeprefix(portal.base)
    assert path.startswith("/reset/new?t=")
    fields = anon.form(path, "/reset/new")
    fields.update(password="a new password 7", password2="a new password 7")
    done = anon.post("/reset/new", fields)
    assert done.status_code == 303 and done.headers["location"] == "/login"
    assert anon.post("/reset/new", fields).status_code == 400  # replayed
    assert "Эта ссылка уже использована." in anon.post("/reset/new", fields).text
    assert v.get("/profile").status_code == 303  # the old session ended with the password
    assert portal.visitor().login("ivanov").status_code == 401
    assert portal.visitor().login("ivanov", "a new password 7").status_code == 303


def test_reset_answer_same_for_unknown_account(portal: Portal, mail: MailServer) -> None:
    _registered(portal, mail)
    known = portal.visitor().submit("/reset", "/reset", name="ivanov")
    unknown = portal.visitor().submit("/reset", "/reset", name="nobody-here")
    assert known.status_code == unknown.status_code == 200
    assert _without_csrf(known.text) == _without_csrf(unknown.text)
    mail.wait_for("ivanov@example.ru")
    assert len(mail.all()) == 2  # the confirmation and one reset letter, none for the unknown name


def test_expired_reset_link_refused(portal: Portal, mail: MailServer, conn: psycopg.Connection) -> None:
    _registered(portal, mail)
    anon = portal.visitor()
    anon.submit("/reset", "/reset", name="ivanov")
    path = link_in(mail.wait_for("ivanov@example.ru")).removeprefix(portal.base)
    fields = anon.form(path, "/reset/new")
    conn.execute("UPDATE portal_token SET expires_at = now() - interval '1 second' WHERE kind = 'reset_password'")
    conn.commit()
    fields.update(password="a new password 7", password2="a new password 7")
    refused = anon.post("/reset/new", fields)
    assert refused.status_code == 400 and "Срок действия ссылки истёк." in refused.text
    assert portal.visitor().login("ivanov").status_code == 303  # the password did not change


def test_wrong_password_and_unknown_login_say_the_same(portal: Portal, mail: MailServer) -> None:
    _registered(portal, mail)
    wrong = portal.visitor().login("ivanov", "not the password")
    unknown = portal.visitor().login("petrov", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert "Неверный логин или пароль." in wrong.text
    assert (_without_csrf(wrong.text).replace('value="ivanov"', "")
            == _without_csrf(unknown.text).replace('value="petrov"', ""))


def test_remember_me_makes_a_lasting_cookie(portal: Portal, mail: MailServer) -> None:
    _registered(portal, mail)
    short = portal.visitor().login("ivanov")
    long = portal.visitor().login("ivanov", remember=True)
    short_cookie = short.headers["set-cookie"]
    long_cookie = long.headers["set-cookie"]
    assert "amr_session=" in short_cookie and "max-age" not in short_cookie.lower()
    assert "Max-Age=2592000" in long_cookie
    for c in (short_cookie, long_cookie):
        assert "HttpOnly" in c and "SameSite=lax" in c


def test_password_change_ends_other_sessions(portal: Portal, mail: MailServer) -> None:
    here, _ = _registered(portal, mail)
    elsewhere = portal.visitor()
    assert elsewhere.login("ivanov").status_code == 303
    page = here.submit("/profile", "/profile/password", current=PASSWORD, password="another one 99",
                       password2="another one 99")
    assert "Пароль изменён. На других устройствах выполнен выход." in page.text
    assert here.get("/profile").status_code == 200
    gone = elsewhere.get("/profile")
    assert gone.status_code == 303 and gone.headers["location"].startswith("/login?next=")
    wrong = here.submit("/profile", "/profile/password", follow=False, current="nope nope nope",
                        password="third one 123", password2="third one 123")
    assert wrong.status_code == 400 and "Текущий пароль введён неверно." in wrong.text


def test_log_out_everywhere(portal: Portal, mail: MailServer) -> None:
    here, _ = _registered(portal, mail)
    elsewhere = portal.visitor()
    elsewhere.login("ivanov", remember=True)
    page = here.submit("/profile", "/logout-all")
    assert "Вы вышли из личного кабинета на всех устройствах." in page.text
    assert here.get("/profile").status_code == 303
    assert elsewhere.get("/profile").status_code == 303


def test_profile_changes_email_phone_never_login(portal: Portal, mail: MailServer) -> None:
    v, letter = _registered(portal, mail)
    confirm(v, link_in(letter))
    profile = v.get("/profile").text
    assert all("login" not in f["fields"] for f in forms(profile))  # no form changes the login
    page = v.submit("/profile", "/profile/email", email="new@example.ru", password=PASSWORD)
    assert "Email не подтвержден" in page.text and "new@example.ru" in page.text
    assert "Адрес электронной почты подтверждён." in confirm(v, link_in(mail.wait_for("new@example.ru"))).text
    page = v.submit("/profile", "/profile/phone", phone="8 (921) 123-45-67")
    assert "+79211234567" in page.text
    bad = v.submit("/profile", "/profile/phone", follow=False, phone="12345")
    assert bad.status_code == 400 and "мобильный номер" in bad.text


def test_registration_refusals(portal: Portal, mail: MailServer, conn: psycopg.Connection) -> None:
    v = portal.visitor()
    wrong = v.register("sidorov", "s@example.ru", captcha_answer="WRONG")
    assert wrong.status_code == 400 and "Символы с картинки введены неверно." in wrong.text
    no_consent = v.register("sidorov", "s@example.ru", pd_consent="")
    assert no_consent.status_code == 400
    assert "Нужно дать согласие на обработку персональных данных." in no_consent.text
    assert conn.execute("SELECT count(*) FROM portal_user").fetchone()[0] == 0
    assert v.register("sidorov", "s@example.ru").status_code == 200
    taken = portal.visitor().register("SIDOROV", "t@example.ru")
    assert taken.status_code == 400 and "Этот логин уже занят." in taken.text


def test_captcha_used_once_and_drawn_offline(portal: Portal) -> None:
    v = portal.visitor()
    fields = v.form("/register", "/register")
    img = [f for f in forms(v.get("/register").text) if f["action"] == "/register"]
    assert img and fields["captcha_id"]
    page = v.get("/register").text
    uri = page.split('class="captcha" src="', 1)[1].split('"', 1)[0]
    assert base64.b64decode(uri.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"
    fields.update(login="petrov", password=PASSWORD, password2=PASSWORD, email="p@example.ru",
                  licence="1", pd_consent="1", captcha_answer=CAPTCHA.lower())
    assert v.post("/register", fields).status_code == 303  # case does not matter
    fields.update(login="petrov2")
    v.http.cookies.delete("amr_session")  # (logged in now, the anonymous form's token would not pass)
    replay = v.post("/register", fields)  # the same captcha again
    assert replay.status_code == 400 and "Символы с картинки введены неверно." in replay.text


def test_pages_work_without_javascript(portal: Portal, mail: MailServer) -> None:
    anon = portal.visitor()
    for path, action in (("/login", "/login"), ("/register", "/register"), ("/reset", "/reset")):
        page = anon.get(path)
        assert page.status_code == 200 and '<html lang="ru">' in page.text
        assert "<script" not in page.text
        found = [f for f in forms(page.text) if f["action"] == action]
        assert found and found[0]["method"] == "post" and found[0]["fields"]["csrf_token"]
    v, _ = _registered(portal, mail)
    profile = v.get("/profile").text
    assert "<script" not in profile and "<table>" in profile
    actions = {f["action"] for f in forms(profile)}
    assert {"/logout", "/profile/resend", "/profile/email", "/profile/phone", "/profile/password",
            "/logout-all"} <= actions
    css = anon.get("/static/portal.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    assert "http" not in css.text  # nothing from the internet


@pytest.mark.parametrize("workers", [1, 2])
def test_amr_portal_serves_the_pages(db_url: str, mail: MailServer, tmp_path: Path, workers: int) -> None:
    """`amr portal` as a process: it serves the login page; insecure cookies off loopback are refused."""
    port = free_port()
    env = {"AMR_DATABASE_URL": db_url, "AMR_PORTAL_BASE_URL": f"http://127.0.0.1:{port}",
           "AMR_PORTAL_SECURE_COOKIES": "false", "AMR_SMTP_URL": mail.url, "AMR_LOG_FORMAT": "text"}
    d = Daemon([sys.executable, "-m", "amr.cli", "portal", "--port", str(port), "--workers", str(workers)], env,
               tmp_path / "portal.log")
    try:
        def page() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
            except httpx.HTTPError:
                return None
        r = d.until(page, "the login page")
        assert isinstance(r, httpx.Response) and r.status_code == 200 and "Вход в личный кабинет" in r.text
        if workers > 1:  # the parent and its worker processes, each serving the same pages
            def started() -> list[str] | None:
                kids = subprocess.run(["ps", "--ppid", str(d.proc.pid), "-o", "pid="], capture_output=True,
                                      text=True).stdout.split()
                return kids if len(kids) >= workers else None
            d.until(started, f"{workers} worker processes")
            assert all(page().status_code == 200 for _ in range(4))  # type: ignore[union-attr]
    finally:
        log = d.stop()
    assert f"serving the customer account on 127.0.0.1:{port} with {workers} worker(s)" in log
    refused = subprocess.run([sys.executable, "-m", "amr.cli", "portal"], capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("AMR_")},
                                  **env, "AMR_PORTAL_BASE_URL": "http://portal.example.ru"}, timeout=60)
    assert refused.returncode == 2 and "AMR_PORTAL_SECURE_COOKIES=false is for http://127.0.0.1" in refused.stderr


def test_smtp_url_forms() -> None:
    t = parse_smtp_url("smtp://mailer:p%40ss@mail.example.ru:587?starttls=true")
    assert (t.host, t.port, t.user, t.password, t.starttls, t.tls) == ("mail.example.ru", 587, "mailer", "p@ss",
                                                                       True, False)
    assert "p@ss" not in repr(t)
    assert parse_smtp_url("smtps://mail.example.ru").port == 465
    for bad, says in (("", "AMR_SMTP_URL is not set"), ("http://mail.example.ru", "must be smtp://"),
                      ("smtp://mail.example.ru:x", "port that is no number")):
        with pytest.raises(MailNotConfigured, match=says):
            parse_smtp_url(bad)


def test_registration_when_the_mail_server_is_down(pg_admin_url: str, db_url: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    url, role = restricted_url(pg_admin_url, db_url)
    p = Portal(url, None, smtp_url=f"smtp://127.0.0.1:{free_port()}")
    try:
        page = p.visitor().register("ivanov", "ivanov@example.ru")
        assert page.status_code == 200 and "письмо для подтверждения адреса отправить не удалось" in page.text
        assert "Email не подтвержден" in page.text
        warned = [r.getMessage() for r in caplog.records if r.name == "amr.portal.auth"]
        assert any("not sent" in m and "127.0.0.1" in m for m in warned)
        assert not any("confirm?t=" in m for m in warned)
    finally:
        p.close()
        drop_role(pg_admin_url, role)
