"""The API's edge over real HTTP: no body is read without a known token, none beyond the bound.

A real uvicorn serves the app on a free port and the client is a raw socket,
so the tests see what the server does with bytes it has not been sent yet:
a refusal that arrives while the client has sent only the headers proves
the body was never read. Without the guard, FastAPI reads the whole body
before it looks at the token, and these tests time out or get 422.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from amr.settings import Settings
from billing.api import TokenStore, create_app, hash_token
from tests.conftest import free_port
from tests.test_billing import add_subscriber

TOKEN = "edge-token-1"
TOKENS = f'[[token]]\nname = "edge"\nsha256 = "{hash_token(TOKEN)}"\naccounts = ["456"]\n'
LIMIT = 64 * 1024
HUGE = 100 * 1024 * 1024


class Served:
    """The app under a real uvicorn in a thread of this process."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served(db_url, conn) -> Iterator[Served]:
    add_subscriber(conn, "123", "single")
    conn.execute("INSERT INTO subscriber (account, metering, plan, category, area) VALUES"
                 " ('456', 'manual', 'single', 'electric_stove', 'rural')")
    conn.execute("INSERT INTO meter (id, account, adapter, max_power_kw, installed) VALUES"
                 " ('m-456', '456', 'manual', 10, '2026-01-01T00:00+03:00')")
    conn.commit()
    app = create_app(Settings(database_url=db_url, api_max_body_bytes=LIMIT), TokenStore.from_toml(TOKENS))
    s = Served(app)
    yield s
    s.close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON body of one response (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest[:length] or b"{}")


def test_a_large_body_without_a_token_is_refused_before_it_is_read(served: Served) -> None:
    for auth in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic YTpi"}):
        with _connect(served.port) as sock:
            sock.sendall(_head("/accounts/456/readings", {"Content-Length": str(HUGE), **auth}))
            # not one byte of the 100 MB sent: the answer must come anyway
            status, headers, body = _response(sock, timeout=5)
        assert status == 401, (auth, body)
        assert body["code"] == "unauthorized" and body["message"]
        assert headers["www-authenticate"] == "Bearer"
        assert headers.get("connection") == "close"  # the server does not read on to the end


def test_a_chunked_body_without_a_token_is_refused_before_it_is_read(served: Served) -> None:
    with _connect(served.port) as sock:
        sock.sendall(_head("/accounts/456/readings", {"Transfer-Encoding": "chunked"}))
        status, _, body = _response(sock, timeout=5)
    assert (status, body["code"]) == (401, "unauthorized")


def test_a_large_declared_body_with_a_token_gets_413_unread(served: Served) -> None:
    with _connect(served.port) as sock:
        sock.sendall(_head("/accounts/456/readings", {"Content-Length": str(HUGE),
                                                      "Authorization": f"Bearer {TOKEN}"}))
        status, headers, body = _response(sock, timeout=5)
    assert status == 413, body
    assert body["code"] == "body_too_large" and str(LIMIT) in body["message"]
    assert headers["content-type"].startswith("application/json")


def test_a_chunked_body_beyond_the_limit_gets_413_as_it_streams(served: Served) -> None:
    """No Content-Length: counted while streaming, cut off at the limit, not at the end of 16 MB."""
    chunk = b"[" + b" " * (16 * 1024 - 2) + b"]"  # 16 KiB a chunk, 1024 of them = 16 MB offered
    sent = 0
    with _connect(served.port) as sock:
        sock.sendall(_head("/accounts/456/readings", {"Transfer-Encoding": "chunked",
                                                      "Authorization": f"Bearer {TOKEN}"}))
        answered = False
        for _ in range(1024):
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                answered = True
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
        assert answered, "the server read all 16 MB without answering"
        status, _, body = _response(sock, timeout=5)
    assert status == 413, body
    assert body["code"] == "body_too_large"
    # the server answered after the limit plus what the socket buffers hold, far from the end
    assert sent < 8 * 1024 * 1024, sent


def test_a_body_within_the_limit_still_reaches_the_endpoint(served: Served) -> None:
    """The guard refuses only what it must: a token and a small body get the endpoint's own answers."""
    body = json.dumps({"readings": [{"ts": "2026-01-05T10:00:00+03:00", "value": "12.5"}]}).encode()
    with _connect(served.port) as sock:
        sock.sendall(_head("/accounts/456/readings", {"Content-Length": str(len(body)),
                                                      "Authorization": f"Bearer {TOKEN}"}) + body)
        status, _, out = _response(sock)
    assert status == 201, out
    assert out["accepted"] == 1
    padded = json.dumps({"readings": [], "pad": " " * (LIMIT - 100)}).encode()
    assert len(padded) <= LIMIT
    with _connect(served.port) as sock:
        sock.sendall(_head("/accounts/456/readings", {"Content-Length": str(len(padded)),
                                                      "Authorization": f"Bearer {TOKEN}"}) + padded)
        status, _, out = _response(sock)
    assert (status, out["code"]) == (422, "invalid_request")  # read and validated, not refused unread


def test_gets_need_no_body_and_keep_their_401(served: Served) -> None:
    with _connect(served.port) as sock:
        sock.sendall(b"GET /accounts/123 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _response(sock)
    assert (status, body["code"], headers["www-authenticate"]) == (401, "unauthorized", "Bearer")
