"""What the customer account's tests share: a real SMTP server, the portal under uvicorn, a form-filling client.

- `MailServer`: aiosmtpd on 127.0.0.1 (a free port) keeping every message it
  receives; `wait_for(to)` returns the next letter to an address.
- `Portal`: `portal.app.create_app` under a real uvicorn in a thread, talking to
  the test's own database, optionally as a login role that is only a member of
  amr_portal (what the pages run as in production).
- `Visitor`: an httpx client with its own cookies that reads the forms of a page
  (action, fields, the csrf_token) the way a browser without JavaScript would.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
import threading
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import httpx
import psycopg
import uvicorn
from aiosmtpd.controller import Controller

from amr.settings import Settings
from portal.app import create_app
from tests.conftest import free_port

CAPTCHA = "KM7TX"  # the answers the tests' captcha generator draws (portal.captcha checks them as any other)
PASSWORD = "correct horse 42"


class _Keep:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.lock = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(msg)  # type: ignore[arg-type]
            self.lock.notify_all()
        return "250 OK"


class MailServer:
    """A real SMTP server on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.keep = _Keep()
        self.controller = Controller(self.keep, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        self.taken = 0

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def all(self) -> list[EmailMessage]:
        with self.keep.lock:
            return list(self.keep.messages)

    def wait_for(self, to: str, timeout: float = 10) -> EmailMessage:
        """The first letter to `to` not returned before."""
        deadline = time.monotonic() + timeout
        with self.keep.lock:
            while True:
                for i, msg in enumerate(self.keep.messages):
                    if i >= self.taken and to in str(msg["To"]):
                        self.taken = i + 1
                        return msg
                left = deadline - time.monotonic()
                assert left > 0, f"no letter to {to} arrived"
                self.keep.lock.wait(left)

    def close(self) -> None:
        self.controller.stop()


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]


def link_in(msg: EmailMessage) -> str:
    m = re.search(r"https?://\S+", body(msg))
    assert m, body(msg)
    return m.group(0)


def restricted_url(admin_url: str, db_url: str) -> tuple[str, str]:
    """A login role that is only a member of amr_portal, and db_url as that role: (url, role)."""
    role = f"portal_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE amr_portal")
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    info["user"] = role
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**info), role


def drop_role(admin_url: str, role: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {role}")


class Portal:
    """The customer account under a real uvicorn on a free port."""

    def __init__(self, database_url: str, mail: MailServer | None, *,
                 captcha_text: Callable[[], str] | None = lambda: CAPTCHA, **settings: Any) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(**{"database_url": database_url, "portal_base_url": self.base,
                                    "portal_secure_cookies": False, "smtp_url": mail.url if mail else "",
                                    **settings})
        self.app = create_app(self.settings, captcha_text=captcha_text)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_config=None, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def visitor(self, **headers: str) -> Visitor:
        return Visitor(self.base, headers)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_ATTR = re.compile(r'([a-zA-Z_-]+)="([^"]*)"')
_INPUT = re.compile(r"<input\b([^>]*)>", re.I)


def forms(page: str) -> list[dict[str, Any]]:
    """The forms of a page as a browser without JavaScript sees them: action, method, fields."""
    out = []
    for attrs, inner in _FORM.findall(page):
        a = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(attrs)}
        fields: dict[str, str] = {}
        for inp in _INPUT.findall(inner):
            ia = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(inp)}
            unchecked = ia.get("type") in ("checkbox", "radio") and "checked" not in inp.lower()
            if "name" in ia and not unchecked:  # a browser sends a box only when it is ticked
                fields[ia["name"]] = ia.get("value", "")
        out.append({"action": a.get("action", ""), "method": a.get("method", "get").lower(),
                    "id": a.get("id", ""), "fields": fields})
    return out


class Visitor:
    """One browser: its own cookies, no JavaScript, forms filled as a person would."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=30, headers=headers)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def form(self, path: str, action: str) -> dict[str, str]:
        """The fields (hidden ones filled in) of the form posting to `action` on the page at `path`."""
        page = self.get(path)
        assert page.status_code == 200, (path, page.status_code, page.text[:300])
        for f in forms(page.text):
            if f["action"] == action and f["method"] == "post":
                return dict(f["fields"])
        raise AssertionError(f"no form posting to {action} on {path}")

    def submit(self, path: str, action: str, follow: bool = True, **values: str) -> httpx.Response:
        """Open `path`, fill the form posting to `action` with `values`, send it; follow the redirect."""
        fields = self.form(path, action)
        fields.update(values)
        response = self.http.post(action, data=fields)
        if follow and response.status_code == 303:
            return self.get(response.headers["location"])
        return response

    def post(self, action: str, data: dict[str, str]) -> httpx.Response:
        return self.http.post(action, data=data)

    def register(self, login: str, mail_to: str, password: str = PASSWORD, **extra: str) -> httpx.Response:
        values = {"login": login, "password": password, "password2": password, "email": mail_to,
                  "licence": "1", "pd_consent": "1", "captcha_answer": CAPTCHA, **extra}
        return self.submit("/register", "/register", **values)

    def login(self, login: str, password: str = PASSWORD, remember: bool = False) -> httpx.Response:
        values = {"login": login, "password": password, **({"remember": "1"} if remember else {})}
        return self.submit("/login", "/login", follow=False, **values)

    def close(self) -> None:
        self.http.close()


def confirm(visitor: Visitor, link: str) -> httpx.Response:
    """Open a confirmation link and press its button, as a person would."""
    path = link.split("://", 1)[1].split("/", 1)[1]
    return visitor.submit("/" + path, "/confirm")
