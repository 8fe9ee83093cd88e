"""A simulated card payment provider (acquirer): a real HTTP server, for tests and demonstrations.

It speaks the provider side of billing/payments.py's HttpProvider:

    POST /payments          create a payment (header Idempotence-Key: the same key
                            returns the same payment); body {"amount": "12.34", ...}
    GET  /payments/{id}     its status: pending, succeeded or failed
    GET  /pay/{id}          the confirmation page: the customer pays here, and the
                            provider then sends its signed callback
    POST /_sim/behaviour    {"behaviour": B, "payment": id (optional)}: how it acts

and calls back: POST to the configured URL with the payment as JSON and the
header X-Payment-Signature, the hex HMAC-SHA256 of the raw body with the
shared key. The signature is computed here independently of billing/ (this is
the other party), so a test proves the two agree.

Behaviours, globally (for payments created from then on) or per payment:
succeed (the default: paid, one callback), fail (declined, one callback with
status failed), timeout (no answer at all to API calls about the payment:
create and status hang until the client gives up; a created payment exists
all the same, as it would at a real provider whose answer was lost), double
(two callbacks at once), late (the callback after `late_s` seconds) and never
(paid, but no callback: only asking for the status finds out).

    python -m simulators.payment_provider --port 8099 --callback http://127.0.0.1:8000/payments/callback --key K
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import logging
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("amr.sim.payments")

BEHAVIOURS = ("succeed", "fail", "timeout", "double", "late", "never")


@dataclass
class SimPayment:
    id: str
    key: str
    amount: Decimal
    description: str
    behaviour: str
    status: str = "pending"
    paid_at: datetime | None = None
    return_url: str = ""  # where the payment page sends the customer back

    def as_json(self, base_url: str) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "amount": str(self.amount),
                "paid_at": self.paid_at.isoformat() if self.paid_at else None,
                "confirmation_url": f"{base_url}/pay/{self.id}"}


@dataclass
class Callback:
    """One callback sent: the payment id, the status it said, and what the receiver answered (None: no answer)."""

    payment: str
    status: str
    answer: int | None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


class PaymentProviderSim:
    """The simulated provider, serving in a thread of its own (`start`, `close`)."""

    def __init__(self, callback_url: str, key: bytes, *, host: str = "127.0.0.1", port: int = 0,
                 behaviour: str = "succeed", late_s: float = 2.0, hang_s: float = 30.0):
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r}: expected one of {', '.join(BEHAVIOURS)}")
        self.callback_url = callback_url
        self.key = key
        self.behaviour = behaviour
        self.late_s = late_s
        self.hang_s = hang_s
        self.payments: dict[str, SimPayment] = {}
        self.by_key: dict[str, str] = {}
        self.callbacks: list[Callback] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> PaymentProviderSim:
        self.thread = threading.Thread(target=self.server.serve_forever, name="payment-sim", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stopping.set()  # wakes the handlers that play at timing out
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(5)

    def __enter__(self) -> PaymentProviderSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_behaviour(self, behaviour: str, payment: str | None = None) -> None:
        """How the provider acts: for one payment, or for every payment created from now on."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r}: expected one of {', '.join(BEHAVIOURS)}")
        with self.lock:
            if payment is None:
                self.behaviour = behaviour
            elif payment in self.payments:
                self.payments[payment].behaviour = behaviour
            else:
                raise KeyError(payment)

    # --- what the provider does -----------------------------------------------------

    def create(self, key: str, amount: Decimal, description: str,
               return_url: str = "") -> tuple[SimPayment, bool]:
        with self.lock:
            if key in self.by_key:
                return self.payments[self.by_key[key]], False
            p = SimPayment(f"sim-{uuid.uuid4().hex[:16]}", key, amount, description, self.behaviour,
                           return_url=return_url)
            self.payments[p.id] = p
            self.by_key[key] = p.id
            return p, True

    def pay(self, payment_id: str) -> SimPayment:
        """The customer confirms at the payment page: the payment ends, the callback goes as behaved."""
        with self.lock:
            p = self.payments[payment_id]
            if p.status != "pending":
                return p
            p.status = "failed" if p.behaviour == "fail" else "succeeded"
            p.paid_at = datetime.now(UTC) if p.status == "succeeded" else None
            behaviour = p.behaviour
        if behaviour == "never":
            return p
        times = 2 if behaviour == "double" else 1
        delay = self.late_s if behaviour == "late" else 0.0
        body = json.dumps(p.as_json(self.url)).encode()
        for _ in range(times):  # the two of a double callback go at once, to race each other
            threading.Thread(target=self._send, args=(p, body, delay), daemon=True).start()
        return p

    def _send(self, p: SimPayment, body: bytes, delay: float) -> None:
        if delay and self.stopping.wait(delay):
            return
        sig = hmac.new(self.key, body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(self.callback_url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Payment-Signature": sig})
        answer: int | None
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer = resp.status
        except urllib.error.HTTPError as exc:
            answer = exc.code
        except OSError as exc:
            log.warning("callback for %s to %s: no answer (%s)", p.id, self.callback_url, exc)
            answer = None
        with self.lock:
            self.callbacks.append(Callback(p.id, p.status, answer))

    def hang(self) -> None:
        """Play at timing out: answer nothing until the client has surely given up (or the server stops)."""
        self.stopping.wait(self.hang_s)


def _handler(sim: PaymentProviderSim) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

        def _json(self, status: int, data: Any) -> None:
            body = json.dumps(data, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(min(length, 1 << 16)) if length else b""
            return json.loads(raw) if raw else {}

        def _no_answer(self) -> None:
            sim.hang()
            self.close_connection = True

        def do_POST(self) -> None:
            with sim.lock:
                sim.requests.append(("POST", self.path))
            try:
                data = self._body()
            except ValueError:
                self._json(400, {"error": "the body is not JSON"})
                return
            if self.path == "/payments":
                key = self.headers.get("Idempotence-Key")
                try:
                    amount = Decimal(str(data.get("amount")))
                    ok = amount.is_finite() and amount > 0 and amount == amount.quantize(Decimal("0.01"))
                except (InvalidOperation, AttributeError):
                    ok = False
                if not key or not ok:
                    self._json(400, {"error": "an Idempotence-Key header and a positive amount in kopecks are needed"})
                    return
                back = data.get("return_url")
                p, new = sim.create(key, amount, str(data.get("description", "")),
                                    back if isinstance(back, str) and back.startswith(("http://", "https://")) else "")
                if p.behaviour == "timeout":
                    self._no_answer()
                    return
                self._json(201 if new else 200, p.as_json(sim.url))
            elif self.path == "/_sim/behaviour":
                try:
                    sim.set_behaviour(str(data.get("behaviour")), data.get("payment"))
                except (ValueError, KeyError) as exc:
                    self._json(400, {"error": str(exc)})
                    return
                self._json(200, {"behaviour": data.get("behaviour"), "payment": data.get("payment")})
            elif self.path.startswith("/pay/"):
                self._pay(self.path.removeprefix("/pay/"))
            else:
                self._json(404, {"error": "not found"})

        def do_GET(self) -> None:
            with sim.lock:
                sim.requests.append(("GET", self.path))
            if self.path.startswith("/payments/"):
                p = sim.payments.get(self.path.removeprefix("/payments/"))
                if p is None:
                    self._json(404, {"error": "no such payment"})
                elif p.behaviour == "timeout":
                    self._no_answer()
                else:
                    self._json(200, p.as_json(sim.url))
            elif self.path.startswith("/pay/"):
                self._pay(self.path.removeprefix("/pay/"))
            elif self.path == "/_sim/payments":
                self._json(200, [p.as_json(sim.url) | {"behaviour": p.behaviour}
                                 for p in list(sim.payments.values())])
            else:
                self._json(404, {"error": "not found"})

        def _pay(self, payment_id: str) -> None:
            if payment_id not in sim.payments:
                self._json(404, {"error": "no such payment"})
                return
            p = sim.pay(payment_id)
            text = "Оплата прошла." if p.status == "succeeded" else "Оплата отклонена банком."
            back = (f'<p><a id="return" href="{html.escape(p.return_url)}">Вернуться в личный кабинет</a></p>'
                    if p.return_url else "")
            body = f"<!DOCTYPE html><html lang=\"ru\"><meta charset=\"utf-8\"><p>{text}</p>{back}</html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.payment_provider",
                                     description="A simulated card payment provider: create, status, "
                                     "confirmation page and signed callbacks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--callback", required=True, metavar="URL", help="where the signed callbacks go")
    parser.add_argument("--key", required=True, metavar="K", help="the shared HMAC key (AMR_PAYMENT_HMAC_KEY)")
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default="succeed")
    parser.add_argument("--late", type=float, default=2.0, metavar="S", help="delay of a late callback")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sim = PaymentProviderSim(args.callback, args.key.encode(), host=args.host, port=args.port,
                             behaviour=args.behaviour, late_s=args.late)
    print(f"payment provider simulator on {sim.url} ({args.behaviour}), callbacks to {args.callback}", flush=True)
    try:
        sim.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stopping.set()
        sim.server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
