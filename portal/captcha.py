"""An image captcha that works offline, its answer kept server-side as a hash, once per form.

The image is drawn by the `captcha` package (BSD-3; its fonts ship inside it,
Pillow draws) when the form is shown and is put in the page as a data: URI,
so the answer itself is never stored anywhere: portal_captcha keeps the
SHA-256 of (the form's captcha id, the answer) and its expiry. Each captcha
is taken once, right or wrong (portal_captcha_take deletes it), so an answer
cannot be replayed and a wrong guess costs a new image.

The answers are random (`random_text`); `create_app(captcha_text=...)` lets
a test choose them, and the check is the same whoever chose them. There is no
switch that turns the captcha off.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from captcha.image import ImageCaptcha

ALPHABET = "ABCDEFHJKMNPRSTUVWXYZ2345789"  # no 0/O, 1/I/L, 6/G: a person reads it at first try
LENGTH = 5
TTL = timedelta(minutes=20)
_image = ImageCaptcha(width=200, height=70)


@dataclass(frozen=True)
class Challenge:
    id: str           # goes in the form (hidden field captcha_id)
    image_uri: str    # data:image/png;base64,... for <img src>


def random_text() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def _answer_hash(captcha_id: str, answer: str) -> bytes:
    normal = "".join(answer.split()).upper()
    return hashlib.sha256(f"{captcha_id}\0{normal}".encode()).digest()


def _id_hash(captcha_id: str) -> bytes:
    return hashlib.sha256(captcha_id.encode("utf-8")).digest()


def new_challenge(conn: psycopg.Connection, text: Callable[[], str] | None = None) -> Challenge:
    """A captcha for one form: its id and image; only the answer's hash is stored."""
    answer = (text or random_text)()
    captcha_id = secrets.token_urlsafe(24)
    conn.execute("SELECT portal_captcha_create(%s, %s, %s)",
                 (_id_hash(captcha_id), _answer_hash(captcha_id, answer), datetime.now(UTC) + TTL))
    png = _image.generate(answer).getvalue()
    return Challenge(captcha_id, "data:image/png;base64," + base64.b64encode(png).decode("ascii"))


def solved(conn: psycopg.Connection, captcha_id: str, answer: str) -> bool:
    """Whether `answer` is this captcha's; the captcha is used up either way."""
    if not captcha_id or len(captcha_id) > 100 or not answer or len(answer) > 20:
        return False
    row = conn.execute("SELECT portal_captcha_take(%s)", (_id_hash(captcha_id),)).fetchone()
    if row is None or row[0] is None:
        return False
    return secrets.compare_digest(bytes(row[0]), _answer_hash(captcha_id, answer))
