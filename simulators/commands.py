"""`amr demo`: a month of simulated meters polled, stored, split into zones and billed."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from decimal import Decimal
from typing import Any

from amr.errors import UserError


def _month(text: str) -> date:
    try:
        return date.fromisoformat(f"{text}-01" if len(text) == 7 else text).replace(day=1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month like 2026-10") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole chain on simulated meters: poll a month, store, split into zones, bill",
        description=(
            "Start a PostgreSQL of its own (unless AMR_DATABASE_URL is set), simulated meters on "
            "Modbus TCP, Modbus RTU and IEC 62056-21 (serial lines on pseudo-terminals) and MQTT "
            "(the broker AMR_MQTT_URL names, else one answering on 127.0.0.1:1883, else a mosquitto "
            "the demo starts itself; without mosquitto installed, the summary says MQTT was left out "
            "and why), plus a manually read "
            "meter; poll them through a month of 30-minute slots with simulated time running fast, "
            "bill the month with the example tariffs, and print per subscriber the energy per zone "
            "and the bill, read back from the database. Everything it started is stopped and removed "
            "at the end (an AMR_DATABASE_URL database keeps the demo's rows)."
        ),
    )
    p.add_argument("--month", type=_month, default=None, metavar="YYYY-MM",
                   help="the month to simulate and bill (default: the last full month)")
    p.add_argument("--days", type=int, default=None, metavar="N",
                   help="simulate only the first N days of the month (a quick run)")
    p.add_argument("--no-mqtt", action="store_true", help="leave the MQTT meter out even if a broker answers")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="port of the /metrics endpoint during the run (default: any free port)")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON lines (one object per subscriber, then the run)")
    p.add_argument("--serve", action="store_true",
                   help="after the summary, keep the database, /metrics, the customer-account API and the "
                        "customer account's web pages running until Ctrl-C, and print their URLs, an API "
                        "token and the demo user's login and password")
    p.add_argument("--api-port", type=int, default=0, help="port of the API with --serve (default: any free)")
    p.add_argument("--portal-port", type=int, default=0,
                   help="port of the customer account (личный кабинет) with --serve (default: any free)")
    p.set_defaults(func=cmd_demo)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from amr import logs
    from simulators.demo import Demo, DemoOptions, quiet_logs

    if args.days is not None and args.days < 1:
        raise UserError("--days must be at least 1")
    logs.setup("WARNING")
    opts = DemoOptions(period=args.month, days=args.days, metrics_port=args.metrics_port,
                       mqtt_url="" if args.no_mqtt else None)
    console = _console()
    with quiet_logs(), _Progress(console, enabled=console is not None and not args.json) as progress:
        demo = Demo(opts, progress=progress.update, say=progress.say)
        result = demo.run(keep_open=args.serve)
    try:
        api = demo.serve_api(result, args.api_port) if args.serve else None
        portal = demo.serve_portal(result, args.portal_port) if args.serve else None
        if args.json:
            print_json(result, api, portal)
        else:
            print_summary(result, api, portal)
        sys.stdout.flush()
        if api is not None:
            _wait_for_interrupt()
    finally:
        demo.close()
    return 0


def _wait_for_interrupt() -> None:
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("serving until Ctrl-C", file=sys.stderr, flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def _console() -> Any:
    """A rich console on stderr when it is a terminal (progress is for people only)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """A progress bar for the polled month on a terminal; plain lines otherwise."""

    def __init__(self, console: Any, enabled: bool):
        self.console = console
        self.enabled = enabled
        self._bar: Any = None  # a rich Progress while a bar is shown
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, what: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if what not in self._tasks:
            label = {"polling": "polling 30-minute slots", "mqtt": "MQTT messages stored"}.get(what, what)
            self._tasks[what] = self._bar.add_task(label, total=total)
        self._bar.update(self._tasks[what], completed=done, total=total)

    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[dim]·[/dim] {text}")
        else:
            print(f"amr demo: {text}", file=sys.stderr, flush=True)


def print_json(result: Any, api: tuple[str, str, Any] | None = None, portal: Any = None) -> None:
    from simulators.demo import next_steps

    for sub in result.subscribers:
        print(json.dumps({"type": "subscriber", "period": result.period.isoformat(), **_plain(sub)}))
    print(json.dumps({
        "type": "run", "period": result.period.isoformat(), "from": result.first.isoformat(),
        "to": result.last.isoformat(), "slots": result.slots, "readings": result.readings,
        "protocols": result.protocols, "mqtt": result.mqtt, "database": result.database,
        "embedded_database": result.embedded, "metrics_url": result.metrics_url,
        "billing": _plain(result.billing), "seconds": result.seconds,
        "api_url": api[0] if api else None, "api_token": api[1] if api else None,
        "portal": {"url": portal.url, "login": portal.login, "password": portal.password,
                   "accounts": portal.accounts} if portal else None,
        "readings_by_protocol": result.readings_by_protocol, "mqtt_left_out": result.mqtt_left_out,
        "next_steps": [{"command": c, "what": w} for c, w in next_steps(result)],
    }))


def print_summary(result: Any, api: tuple[str, str, Any] | None = None, portal: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from simulators.demo import next_steps

    console = Console(soft_wrap=True)  # lines copied whole: wrapped only by the reader's terminal
    days = (result.last - result.first).days
    console.print(
        f"\n[bold]amr demo[/bold]: {days} day(s) of {result.period:%B %Y} polled in {result.seconds} s "
        f"({result.slots} slots of 30 minutes; readings of every protocol: "
        + ", ".join(f"{v} {k}" for k, v in result.readings.items()) + ")", soft_wrap=True,
    )
    console.print("protocols: " + ", ".join(result.protocols))
    if result.readings_by_protocol:
        console.print("readings stored by protocol: "
                      + ", ".join(f"{k} {v}" for k, v in result.readings_by_protocol.items()), soft_wrap=True)
    if result.mqtt_left_out:
        console.print(f"[yellow]MQTT left out[/yellow]: {escape(result.mqtt_left_out)}", soft_wrap=True)
    for sub in result.subscribers:
        console.print(
            f"\n[bold]account {sub['account']}[/bold] · {sub['plan']} · {sub['category']}/{sub['area']} · "
            f"{sub['metering']} metering · meters {', '.join(sub['meters'])} · {sub['readings']} readings"
        )
        table = Table(show_edge=False)
        table.add_column("zone")
        table.add_column("kWh", justify="right")
        table.add_column("rate, RUB/kWh", justify="right")
        table.add_column("amount, RUB", justify="right")
        bill = sub["bill"]
        if bill:
            for line in bill["lines"]:
                table.add_row(line["zone"], f"{line['kwh']:.3f}", str(line["rate"]), str(line["amount"]))
            table.add_row("[bold]total[/bold]", f"[bold]{bill['kwh']:.3f}[/bold]", "",
                          f"[bold]{bill['total']}[/bold]")
            console.print(table)
        else:
            console.print("  [yellow]no bill: held back[/yellow]")
        zones = ", ".join(f"{z} {sub['zones'][z]:.3f}" for z in ("peak", "half_peak", "night"))
        console.print(f"  energy by zone, kWh: {zones} (placement estimated: {sub['estimated_kwh']:.3f})")
    for h in result.billing.get("held") or []:
        console.print(f"[yellow]held back[/yellow] account {h['account']}: {h['reason']}")
    console.print("\n[bold]where to look next[/bold]")
    if api is not None:
        url, token, _ = api
        console.print(f"  metrics:  {result.metrics_url}")
        console.print(f"  API:      {url}/docs   (token {token})")
        console.print(f'            curl -H "Authorization: Bearer {token}" {url}/accounts/990001/bills')
    if portal is not None:
        console.print(f"  account:  {portal.url}/login   login {portal.login}, password {escape(portal.password)} "
                      f"(личный кабинет; accounts {', '.join(portal.accounts)} linked; payments go to a "
                      "simulated provider)")
    else:
        console.print(f"  metrics:  {result.metrics_url} served while the demo ran; `amr demo --serve` keeps "
                      "it and the customer-account API up until Ctrl-C")
    console.print("  daemons:  amr gateway, amr collect and amr api serve /metrics on AMR_METRICS_PORT (9108); "
                  "Grafana dashboard: deploy/grafana/amr-dashboard.json")
    if result.embedded and api is None:
        console.print("  data:     the embedded database is removed at the end: run `amr demo --serve` to keep "
                      "it until Ctrl-C, or set AMR_DATABASE_URL to a database of yours; then, with "
                      "AMR_DATABASE_URL set to it:", soft_wrap=True)
    elif result.embedded:
        console.print(f"  data:     {result.database} until Ctrl-C; with AMR_DATABASE_URL set to it:", soft_wrap=True)
    else:
        console.print(f"  data:     {result.database}; with AMR_DATABASE_URL set to it:", soft_wrap=True)
    width = max(len(c) for c, _ in next_steps(result))
    for command, what in next_steps(result):  # one line each, never wrapped: they are copied whole
        console.print(f"    {escape(command):<{width}}   {escape(what)}", soft_wrap=True, highlight=False)
    console.print("  amr --help lists every command; deploy/ has systemd units, Prometheus rules, a compose file")
