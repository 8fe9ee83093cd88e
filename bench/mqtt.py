"""Benchmark: readings per second from the MQTT broker into the database through the collector.

Measured in the same run, on the same machine, against a Mosquitto of its own:

- raw COPY: readings/s of a bare COPY into a table shaped like `reading`
  (with its primary key): the database's limit for our rows;
- bare paho receive: readings/s a plain paho-mqtt QoS 1 subscriber drains from
  the broker (the broker and client library limit);
- the ingestion entry point alone (collector.ingest.ingestor.Ingestor on the same
  readings, no MQTT): the ceiling of the collector;
- gateway uplink: readings/s from the spool to the broker (one batch in
  flight, removed after PUBACK) beside a bare paho QoS 1 publish of the same
  messages;
- collector, one reading per message and batched messages: readings/s the
  collector (decode, validate, COPY, derive intervals and zones, commit, then
  PUBACK) drains from the broker into the database. The batched messages come
  from 400 meters behind 4 gateways, each on its own topic, as a fleet
  publishes; measured with one ingestion worker, with --workers, with every
  meter behind one gateway (one topic: one worker does the work), and as two
  collector processes of one worker each on one shared subscription.

Each path drains a queue the broker already holds for a persistent session,
so the publisher's speed does not enter the figure, into a database of its
own that holds the same stored history, so the order of the paths does not
enter it either. Target: the batched path
at 0.5 or more of the raw COPY rate.

    .venv/bin/python bench/mqtt.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import psycopg  # noqa: E402

from adapters.wire import AMR_SUBSCRIBE  # noqa: E402
from amr.runtime import tune_gc  # noqa: E402
from amr.settings import Settings  # noqa: E402
from amr.storage import migrate  # noqa: E402
from collector.inventory import parse_inventory, upsert_inventory  # noqa: E402
from collector.mqtt.client import connect_properties, parse_broker_url  # noqa: E402
from collector.mqtt.consumer import Consumer, shared  # noqa: E402
from simulators import mqtt_sim  # noqa: E402
from simulators.consumption import ConsumptionModel  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.dir = tempfile.mkdtemp(prefix="amr-bench-mosq-")
        self.port = free_port()
        conf = Path(self.dir) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 0\nmax_inflight_messages 0\nmax_queued_bytes 0\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            try:
                c.connect("127.0.0.1", self.port)
                c.disconnect()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_db(admin_url: str) -> str:
    name = f"amr_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**info)
    with psycopg.connect(url) as c:
        c.execute("SET TIME ZONE 'UTC'")
        migrate.migrate(c)
        c.commit()
    return url


def drop_db(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def messages(meters: int, steps: int, per_message: int, start: datetime, first: int = 0,
             gateways: int = 1) -> list[tuple[str, bytes]]:
    """`steps` slots of `meters` meters behind `gateways` gateways, each on its own topic, slot by slot."""
    devices = range(first, first + meters)
    models = {n: ConsumptionModel(seed=n) for n in devices}
    per = -(-meters // gateways)
    fleet = [(f"gw{g}", devices[g * per:(g + 1) * per]) for g in range(gateways)]
    out: list[tuple[str, bytes]] = []
    for k in range(steps):
        for source, own in fleet:
            out.extend(mqtt_sim.messages("amr", own, start + timedelta(minutes=30 * k), models,
                                         batch=per_message, source=source))
    return out


def publish_all(port: int, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def create_session(port: int, client_id: str, topic_filter: str) -> None:
    """Make the broker keep a queue for client_id, then leave."""
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", port, clean_start=True, properties=connect_properties())
    c.loop_start()
    c.subscribe(topic_filter, 1)
    done.wait(10)
    c.disconnect()
    c.loop_stop()


def bare_receive_rate(port: int, msgs: list[tuple[str, bytes]], readings: int) -> float:
    cid = f"bench-bare-{uuid.uuid4().hex[:6]}"
    create_session(port, cid, AMR_SUBSCRIBE[0])
    publish_all(port, msgs)
    got = 0
    done = threading.Event()

    def on_message(client, userdata, msg) -> None:
        nonlocal got
        got += 1
        if got >= len(msgs):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect("127.0.0.1", port, clean_start=False, properties=connect_properties())
    c.loop_start()
    done.wait(300)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return readings / dt


def raw_copy_rate(url: str, rows: int, start: datetime, tries: int = 3) -> float:
    """Best of `tries`: the limit, not the noise of a machine shared with other work."""
    return max(_raw_copy_once(url, rows, start) for _ in range(tries))


def _raw_copy_once(url: str, rows: int, start: datetime) -> float:
    with psycopg.connect(url) as c:
        c.execute("CREATE TABLE bench_copy (LIKE reading INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        c.execute("ALTER TABLE bench_copy ADD PRIMARY KEY (meter_id, register, ts)")
        c.commit()
        data = [(f"sim-{i % 100:04d}", "1.8.0", start + timedelta(minutes=30 * (i // 100)), 1000 + i / 100,
                 [], "mqtt:bench") for i in range(rows)]
        t0 = time.perf_counter()
        with c.cursor() as cur, cur.copy(
            "COPY bench_copy (meter_id, register, ts, value, quality, source) FROM STDIN"
        ) as cp:
            for row in data:
                cp.write_row(row)
        c.commit()
        dt = time.perf_counter() - t0
        c.execute("DROP TABLE bench_copy")
        c.commit()
    return rows / dt


def _items(msgs: list[tuple[str, bytes]], batch: int) -> list[list]:
    """The readings of `msgs`, decoded as the collector decodes them, `batch` messages a list."""
    from adapters import mqtt_formats as fmt

    out = []
    for i in range(0, len(msgs), batch):
        items = []
        for t, p in msgs[i: i + batch]:
            items.extend(fmt.to_items(fmt.decode(t, p), p, None))
        out.append(items)
    return out


@contextlib.contextmanager
def prepared_db(admin_url: str, meters: int, history: list[tuple[str, bytes]], batch: int) -> Iterator[str]:
    """A database of its own for one path: the inventory, and `history` stored untimed.

    Every collector path starts from this same state (the same earlier readings
    to derive intervals from, the same table sizes), so the order in which the
    paths run does not enter their figures.
    """
    from collector.ingest.ingestor import Ingestor

    url = make_db(admin_url)
    try:
        with psycopg.connect(url) as c:
            inv = {"subscriber": [{"account": "1"}],
                   "meter": [{"id": mqtt_sim.device_name("amr", n), "account": "1", "adapter": "mqtt"}
                             for n in range(meters)]}
            upsert_inventory(c, parse_inventory(inv))
            c.execute("SET TIME ZONE 'UTC'")
            c.commit()
            ing = Ingestor(c, Settings(database_url=url, metrics_port=0))
            for items in _items(history, batch):
                ing.ingest(items)
        yield url
    finally:
        drop_db(admin_url, url)


def ingest_only_rate(url: str, msgs: list[tuple[str, bytes]], readings: int, batch: int) -> float:
    """The ingestion entry point alone on the same readings, decoded beforehand: the collector's ceiling."""
    from collector.ingest.ingestor import Ingestor

    batches = _items(msgs, batch)
    with psycopg.connect(url) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.commit()
        ing = Ingestor(c, Settings(database_url=url, metrics_port=0))
        t0 = time.perf_counter()
        for items in batches:
            ing.ingest(items)
        dt = time.perf_counter() - t0
    return readings / dt


def _drain(url: str, readings: int, start: Callable[[], None],
           done: Callable[[], bool] | None = None) -> tuple[int, float]:
    """Call start(), then wait until `readings` more rows are in `reading`: (stored, seconds).

    `done`, when given, says the work is finished without asking the database
    (a count of the growing table every few milliseconds would load the very
    server being measured); the rows are counted once at the end.
    """
    with psycopg.connect(url, autocommit=True) as c:
        base = c.execute("SELECT count(*) FROM reading").fetchone()[0]
        t0 = time.perf_counter()
        start()
        deadline = time.monotonic() + 600
        n = 0
        while time.monotonic() < deadline:
            if done is not None:
                if not done():
                    time.sleep(0.005)
                    continue
                dt = time.perf_counter() - t0
                return c.execute("SELECT count(*) FROM reading").fetchone()[0] - base, dt
            n = c.execute("SELECT count(*) FROM reading").fetchone()[0] - base
            if n >= readings:
                break
            time.sleep(0.1)
        return n, time.perf_counter() - t0


def collector_rate(
    port: int, url: str, msgs: list[tuple[str, bytes]], readings: int, batch: int, workers: int = 1
) -> float:
    cid = f"bench-col-{uuid.uuid4().hex[:6]}"
    group = f"bench{uuid.uuid4().hex[:6]}"
    create_session(port, cid, shared(group, AMR_SUBSCRIBE[0]))
    publish_all(port, msgs)
    settings = Settings(database_url=url, metrics_port=0)
    consumer = Consumer(parse_broker_url(f"mqtt://127.0.0.1:{port}"), url, cid, group=group,
                        families=["amr"], settings=settings, batch_messages=batch, batch_wait=0.02,
                        receive_maximum=65535, workers=workers)
    consumer.prepare()  # worker processes started and connected: a running collector, not its start-up
    th = threading.Thread(target=consumer.run, daemon=True)
    # every message acknowledged means every reading committed
    n, dt = _drain(url, readings, th.start, lambda: consumer.stored_messages >= len(msgs))
    consumer.stop()
    th.join(30)
    print(f"  collector, {len(msgs)} messages: {dt:.2f} s, of which decode {consumer.decode_seconds:.2f} s,"
          f" ingestion {consumer.ingest_seconds:.2f} s", file=sys.stderr)
    if n < readings:
        raise SystemExit(f"collector stored {n} of {readings} readings within the time limit")
    return readings / dt


def collector_processes_rate(
    port: int, url: str, msgs: list[tuple[str, bytes]], readings: int, batch: int, processes: int
) -> float:
    """Collector processes on one shared subscription, as deployed to scale out.

    Each process has its own persistent session in the share group; the broker
    splits the queued messages between them. Timing starts when every process
    has imported and is about to connect.
    """
    group = f"bench{uuid.uuid4().hex[:6]}"
    cids = [f"bench-proc-{uuid.uuid4().hex[:6]}" for _ in range(processes)]
    for cid in cids:
        create_session(port, cid, shared(group, AMR_SUBSCRIBE[0]))
    publish_all(port, msgs)
    children = [subprocess.Popen([sys.executable, __file__, "--child", str(port), url, cid, group, str(batch)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for cid in cids]
    try:
        for ch in children:
            if ch.stdout is None or ch.stdout.readline().strip() != "ready":
                raise SystemExit("a collector process did not start")
        def go() -> None:
            for ch in children:
                assert ch.stdin is not None
                ch.stdin.write("go\n")
                ch.stdin.flush()

        n, dt = _drain(url, readings, go)
    finally:
        for ch in children:
            ch.terminate()
            ch.wait(30)
    if n < readings:
        raise SystemExit(f"collector processes stored {n} of {readings} readings within the time limit")
    return readings / dt


def _child(port: str, url: str, cid: str, group: str, batch: str) -> int:
    """One collector process of collector_processes_rate: waits for "go", then consumes until killed."""
    import signal

    consumer = Consumer(parse_broker_url(f"mqtt://127.0.0.1:{port}"), url, cid, group=group,
                        families=["amr"], settings=Settings(database_url=url, metrics_port=0),
                        batch_messages=int(batch), batch_wait=0.02, receive_maximum=65535)
    signal.signal(signal.SIGTERM, lambda *a: consumer.stop())
    print("ready", flush=True)
    sys.stdin.readline()
    consumer.run()
    return 0


def uplink_rates(port: int, readings: int, batch: int, start: datetime) -> tuple[float, float]:
    """Gateway side: spool -> broker (PUBACK) drain rate, and bare paho publish of the same messages."""
    from adapters.reading import Reading
    from adapters.wire import amr_v1_payload
    from collector.gateway.spool import Spool
    from collector.gateway.uplink import MqttForwarder, Uplink

    models = {n: ConsumptionModel(seed=n) for n in range(100)}
    items = [Reading(f"sim-{n:04d}", "1.8.0", start + timedelta(minutes=30 * k),
                     models[n].energy_kwh(start + timedelta(minutes=30 * k)), frozenset(), "modbus")
             for k in range(readings // 100) for n in range(100)]
    payloads = [amr_v1_payload(items[i: i + batch], "bench") for i in range(0, len(items), batch)]
    bare = 0.0
    for _ in range(2):  # best of two: the limit
        t0 = time.perf_counter()
        publish_all(port, [("amr/v1/bench/readings", p) for p in payloads])
        bare = max(bare, len(items) / (time.perf_counter() - t0))
    with tempfile.TemporaryDirectory() as d:
        spool = Spool(Path(d) / "spool.sqlite", len(items) + 1)
        for i in range(0, len(items), 1000):
            spool.put(items[i: i + 1000])
        fwd = MqttForwarder(parse_broker_url(f"mqtt://127.0.0.1:{port}"), "amr/v1/bench/readings")
        uplink = Uplink(spool, fwd, batch_size=batch)
        fwd.conn.up.wait(10)
        t0 = time.perf_counter()
        while uplink.drain_once():
            pass
        drained = len(items) / (time.perf_counter() - t0)
        fwd.close()
        spool.close()
    return drained, bare


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        tune_gc()
        return _child(*argv[1:6])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs PostgreSQL (AMR_BENCH_ADMIN_URL) and /usr/sbin/mosquitto.")
    p.add_argument("--quick", action="store_true", help="small run (seconds), for a smoke check")
    p.add_argument("--meters", type=int, default=400, help="simulated meters (400)")
    p.add_argument("--gateways", type=int, default=4,
                   help="gateways the meters publish through, each on its own amr/v1 topic (4)")
    p.add_argument("--per-message", type=int, default=100, help="readings per batched message (100)")
    p.add_argument("--workers", type=int, default=2, help="ingestion processes of the collector (2)")
    p.add_argument("--batch", type=int, default=500,
                   help="messages per transaction, as amr collect --batch (500)")
    p.add_argument("--admin-url", default=os.environ.get(
        "AMR_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL URL allowed to create a database (AMR_BENCH_ADMIN_URL)")
    args = p.parse_args(argv)
    tune_gc()  # as `amr` does in every command: the collector measured is the one deployed
    single_steps, batch_steps = (20, 50) if args.quick else (100, 800)
    # every path stores the same slots after the same stored history (a steady stream,
    # with no gap interval cut into many zone parts at its start), each in a database of its own
    slot = timedelta(minutes=30)
    start = (datetime.now(UTC) - (single_steps + batch_steps) * slot - timedelta(days=1)).replace(
        minute=0, second=0, microsecond=0)
    run_at = start + single_steps * slot
    broker = Mosquitto()
    results: dict[str, float] = {}
    m, gw, per, w, bm = args.meters, args.gateways, args.per_message, args.workers, args.batch
    admin = args.admin_url
    try:
        single = messages(100, single_steps, 1, run_at)
        single_history = messages(100, single_steps, per, start)
        batched = messages(m, batch_steps, per, run_at, gateways=gw)
        one_gateway = messages(m, batch_steps, per, run_at)
        history = messages(m, single_steps, per, start, gateways=gw)
        n_single, n_batched = len(single), m * batch_steps
        with prepared_db(admin, m, [], bm) as url:
            results["raw COPY"] = raw_copy_rate(url, n_batched, run_at)
        results["bare paho receive, 1 reading/message"] = bare_receive_rate(broker.port, single, n_single)
        results[f"bare paho receive, {per} readings/message"] = bare_receive_rate(
            broker.port, batched, n_batched)
        with prepared_db(admin, m, history, bm) as url:
            results[f"ingestion entry point alone, batches of {bm * per}"] = ingest_only_rate(
                url, batched, n_batched, bm)
        with prepared_db(admin, 100, single_history, bm) as url:
            results["collector, 1 reading/message"] = collector_rate(broker.port, url, single, n_single, 500)
        with prepared_db(admin, m, history, bm) as url:
            results[f"collector, {per} readings/message, 1 worker"] = collector_rate(
                broker.port, url, batched, n_batched, bm)
        with prepared_db(admin, m, history, bm) as url:
            results[f"collector, {per} readings/message, {w} workers"] = collector_rate(
                broker.port, url, batched, n_batched, bm, workers=w)
        with prepared_db(admin, m, history, bm) as url:
            results[f"collector, {per} readings/message, {w} workers, one gateway"] = collector_rate(
                broker.port, url, one_gateway, n_batched, bm, workers=w)
        with prepared_db(admin, m, history, bm) as url:
            results[f"collector, {per} readings/message, 2 collectors, 1 worker each"] = collector_processes_rate(
                broker.port, url, batched, n_batched, bm, processes=2)
        drained, bare_pub = uplink_rates(broker.port, n_batched, 500, start)
    finally:
        broker.close()
    copy = results["raw COPY"]
    print(f"readings: {n_single} as single messages (100 meters), {n_batched} in messages of {per}; "
          f"{m} meters behind {gw} gateways; {os.cpu_count()} CPUs")
    print(f"{'path':48s} {'readings/s':>12s} {'/ raw COPY':>11s}")
    for name, rate in results.items():
        print(f"{name:48s} {rate:12.0f} {rate / copy:11.2f}")
    print(f"gateway uplink, spool -> broker PUBACK, 500 readings/message: {drained:.0f} readings/s; "
          f"bare paho QoS 1 publish of the same messages: {bare_pub:.0f} readings/s; "
          f"ratio {drained / bare_pub:.2f}")
    batched_ratio = results[f"collector, {per} readings/message, {w} workers"] / copy
    ceiling = max(v for k, v in results.items() if k.startswith("ingestion entry point")) / copy
    print(f"target: batched collector >= 0.5 x raw COPY: {'met' if batched_ratio >= 0.5 else 'NOT met'} "
          f"({batched_ratio:.2f}; the ingestion entry point alone reaches {ceiling:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
