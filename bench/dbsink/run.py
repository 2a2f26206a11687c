"""bench-dbsink: simulated meters -> Mosquitto -> mqtt_listen -> outbox -> Celery workers ->
the owner's own PostgreSQL table and the owner's own MariaDB table (database destinations).

Measured in one run, on a private Mosquitto, a fresh platform database, and fresh owner databases
on the machine's PostgreSQL and MariaDB:
  * raw: rows/s the same target tables take from a plain driver client — 1,000-row batches, one
    transaction each, COPY / multi-row INSERT, and the same upsert the destinations use;
  * backlog: BACKLOG due deliveries already in the outbox, drained into one target: rows/s;
  * ingest rate: FAST_EVENTS offered at FAST_RATE/s (QoS 1) into PostgreSQL by meters that
    have spoken before: the rate LISTENERS listener copies commit them at, the rows written to
    the target, and the delivery backlog sampled every second until all are in (does delivery
    keep up with ingest?);
  * steady: 1,000 events/s offered into both targets: publish -> committed p50/p99 per target.
Latency is measured in the targets themselves: each table stamps its rows with the server clock
at insert (`committed_at` default, inside the committing transaction); the publisher puts its
publish time in the event's `ts`. Full size by default; BENCH_SMALL=1 for CI. The last line is
one JSON object. Needs PostgreSQL, MariaDB, Redis and Mosquitto on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    LIVE,
    MOSQUITTO_PIDS,
    PG_ADMIN_URL,
    REDIS_URL,
    ROOT,
    SMALL,
    CpuMeter,
    emit,
    listen_args,
    log,
    mosquitto,
    percentile,
    pg_backend_cpu,
    pg_backends,
    platform_env,
    postgres_database,
    publish_meters,
    send_drain_tasks,
    settle,
    spawn_celery_workers,
    spawn_manage,
    stop_group,
    tree_cpu,
)

BACKLOG = 10_000 if SMALL else 100_000
RAW = 10_000 if SMALL else 50_000
FAST_RATE = int(os.environ.get("BENCH_FAST_RATE", "8000"))
FAST_EVENTS = int(os.environ.get("BENCH_FAST_EVENTS", 8_000 if SMALL else 80_000))
STEADY_RATE = 1000
STEADY_SECONDS = 5 if SMALL else 20
DEVICES = 100 if SMALL else 1000
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))  # Celery prefork processes
# Listener copies behind a shared subscription (as in bench-ingest): one copy alone ingests
# about half of FAST_RATE here, so with one the fast phase would measure the listener.
LISTENERS = int(os.environ.get("BENCH_LISTENERS", "2"))
# A subset of the phases, e.g. BENCH_PHASES=fast (while working on one of them).
PHASES = set(os.environ.get("BENCH_PHASES", "raw,backlog,fast,steady").split(","))
MARIADB = os.environ.get("BENCH_MARIADB_URL", "mysql://root@127.0.0.1:3306/")
BATCH = 1000

PG_TABLE = """
CREATE TABLE {name} (
    seq_id bigint GENERATED ALWAYS AS IDENTITY,
    event_id varchar(64) PRIMARY KEY,
    device_id varchar(63) NOT NULL,
    ts timestamptz NOT NULL,
    voltage double precision,
    power double precision,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""
MARIA_TABLE = """
CREATE TABLE {name} (
    seq_id bigint NOT NULL AUTO_INCREMENT UNIQUE,
    event_id varchar(64) PRIMARY KEY,
    device_id varchar(63) NOT NULL,
    ts datetime(6) NOT NULL,
    voltage double,
    power double,
    committed_at datetime(6) NOT NULL DEFAULT current_timestamp(6)
) ENGINE=InnoDB"""
MAPPING = [
    ["event_id", "${id}"],
    ["device_id", "${device.id}"],
    ["ts", "${ts}"],
    ["voltage", "${data.voltage}"],
    ["power", "${data.power}"],
]


# --- the owner's databases --------------------------------------------------------------------


class Targets:
    """A fresh database on each server, with the `readings` table the destinations write to."""

    def __init__(self) -> None:
        import psycopg
        import pymysql

        self.name = f"bench_owner_{uuid.uuid4().hex[:8]}"
        admin = PG_ADMIN_URL.replace("postgres://", "postgresql://", 1)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.pg_url = admin.rsplit("/", 1)[0] + f"/{self.name}"
        self.pg = psycopg.connect(self.pg_url, autocommit=True)
        for table in ("readings", "raw_readings"):
            self.pg.execute(PG_TABLE.format(name=table))
        m = _mysql_params()
        self.maria = pymysql.connect(autocommit=True, **m)
        with self.maria.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{self.name}`")
            cur.execute(f"USE `{self.name}`")
            cur.execute("SET time_zone = '+00:00'")
            for table in ("readings", "raw_readings"):
                cur.execute(MARIA_TABLE.format(name=table))

    def close(self) -> None:
        import psycopg

        self.pg.close()
        with self.maria.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        self.maria.close()
        admin = PG_ADMIN_URL.replace("postgres://", "postgresql://", 1)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def count(self, engine: str, prefix: str) -> int:
        query = "SELECT count(*) FROM readings WHERE device_id LIKE %s"
        return self._one(engine, query, (f"{prefix}-%",))[0]

    def span(self, engine: str, prefix: str) -> tuple[int, datetime | None, datetime | None]:
        query = (
            "SELECT count(*), min(committed_at), max(committed_at) FROM readings"
            " WHERE device_id LIKE %s"
        )
        n, first, last = self._one(engine, query, (f"{prefix}-%",))
        return n, _utc(first), _utc(last)

    def last_committed(self, engine: str, prefix: str) -> datetime | None:
        query = "SELECT max(committed_at) FROM readings WHERE device_id LIKE %s"
        return _utc(self._one(engine, query, (f"{prefix}-%",))[0])

    def latencies_ms(self, engine: str, prefix: str) -> list[float]:
        query = "SELECT ts, committed_at FROM readings WHERE device_id LIKE %s"
        rows = self._all(engine, query, (f"{prefix}-%",))
        return [(_utc(c) - _utc(t)).total_seconds() * 1000 for t, c in rows]

    def _one(self, engine: str, query: str, params: tuple) -> tuple:
        return self._all(engine, query, params)[0]

    def _all(self, engine: str, query: str, params: tuple) -> list[tuple]:
        if engine == "postgres":
            return self.pg.execute(query, params).fetchall()
        with self.maria.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall())

    # --- the raw baseline: a plain driver client, same server, same table shape ------------

    def raw_rates(self) -> dict[str, float]:
        now = datetime.now(UTC)
        rows = [(f"raw_{i}", f"raw-{i % DEVICES}", now, 750.0, float(i)) for i in range(RAW)]
        return {
            "raw_pg_copy_per_s": self._raw_pg(rows, upsert=False),
            "raw_pg_upsert_per_s": self._raw_pg(rows, upsert=True),
            "raw_maria_insert_per_s": self._raw_maria(rows, upsert=False),
            "raw_maria_upsert_per_s": self._raw_maria(rows, upsert=True),
        }

    def _raw_pg(self, rows: list[tuple], upsert: bool) -> float:
        import psycopg

        columns = "event_id, device_id, ts, voltage, power"
        with psycopg.connect(self.pg_url) as conn:
            conn.execute("TRUNCATE raw_readings")
            conn.commit()
            t0 = time.perf_counter()
            for start in range(0, len(rows), BATCH):
                chunk = rows[start : start + BATCH]
                with conn.cursor() as cur:
                    if upsert:
                        marks = ", ".join(["(%s, %s, %s, %s, %s)"] * len(chunk))
                        cur.execute(
                            f"INSERT INTO raw_readings ({columns}) VALUES {marks}"
                            " ON CONFLICT (event_id) DO UPDATE SET voltage = excluded.voltage,"
                            " power = excluded.power",
                            [v for row in chunk for v in row],
                        )
                    else:
                        with cur.copy(f"COPY raw_readings ({columns}) FROM STDIN") as copy:
                            for row in chunk:
                                copy.write_row(row)
                conn.commit()
            rate = len(rows) / (time.perf_counter() - t0)
        log(f"raw postgres {'upsert' if upsert else 'copy'}: {rate:.0f} rows/s")
        return rate

    def _raw_maria(self, rows: list[tuple], upsert: bool) -> float:
        import pymysql

        conn = pymysql.connect(database=self.name, **_mysql_params())
        naive = [(a, b, c.replace(tzinfo=None), d, e) for a, b, c, d, e in rows]
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
            cur.execute("TRUNCATE raw_readings")
            suffix = (
                " ON DUPLICATE KEY UPDATE voltage = VALUES(voltage), power = VALUES(power)"
                if upsert
                else ""
            )
            statement = (
                "INSERT INTO raw_readings (event_id, device_id, ts, voltage, power)"
                " VALUES (%s, %s, %s, %s, %s)" + suffix
            )
            t0 = time.perf_counter()
            for start in range(0, len(naive), BATCH):
                cur.executemany(statement, naive[start : start + BATCH])
                conn.commit()
            rate = len(rows) / (time.perf_counter() - t0)
        conn.close()
        log(f"raw mariadb {'upsert' if upsert else 'insert'}: {rate:.0f} rows/s")
        return rate


def _mysql_params() -> dict:
    from urllib.parse import urlparse

    u = urlparse(MARIADB)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": u.username or "root",
        "password": u.password or "",
    }


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- the platform -------------------------------------------------------------------------------


def shell(env: dict[str, str], code: str) -> None:
    command = [sys.executable, "manage.py", "shell", "-c", code]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def setup(env: dict[str, str], targets: Targets, prefixes: list[str]) -> None:
    m = _mysql_params()
    pg = PG_ADMIN_URL.split("://", 1)[1].split("/", 1)[0]
    pg_user, pg_host = pg.split("@") if "@" in pg else ("postgres", pg)
    pg_host, _, pg_port = pg_host.partition(":")
    shell(
        env,
        "from apps.owners.models import Owner\n"
        "from apps.devices.models import Device\n"
        "from apps.forwarding.database.models import DatabaseDestination\n"
        "o, _ = Owner.objects.get_or_create(slug='bench', defaults={'name': 'Bench'})\n"
        f"for p in {prefixes!r}:\n"
        f"    Device.objects.bulk_create([Device(owner=o, device_id=f'{{p}}-{{i}}',"
        f" topic=f'{{p}}-{{i}}', profile='meter-v2', expected_interval=3600)"
        f" for i in range({DEVICES})])\n"
        "common = dict(owner=o, tls_mode='disable', table='readings',"
        f" column_mapping={MAPPING!r}, write_mode='upsert', key_columns=['event_id'],"
        f" batch_size={BATCH}, event_types=['telemetry'], enabled=False)\n"
        f"DatabaseDestination.objects.create(name='pg', engine='postgres', host={pg_host!r},"
        f" port={int(pg_port or 5432)}, database_name={targets.name!r}, username={pg_user!r},"
        " password='bench', **common)\n"
        f"DatabaseDestination.objects.create(name='maria', engine='mysql', host={m['host']!r},"
        f" port={m['port']}, database_name={targets.name!r}, username={m['user']!r},"
        f" password={m['password']!r}, schema='', **common)\n",
    )


def enable(env: dict[str, str], *names: str) -> None:
    shell(
        env,
        "from apps.forwarding.database.models import DatabaseDestination\n"
        "DatabaseDestination.objects.update(enabled=False)\n"
        f"DatabaseDestination.objects.filter(name__in={list(names)!r}).update(enabled=True)\n",
    )


def fill_backlog(env: dict[str, str], count: int, prefix: str) -> None:
    """`count` due deliveries through the real write_outbox, as the listener writes them."""
    shell(
        env,
        "from django.db import transaction\n"
        "from django.utils import timezone\n"
        "from apps.devices.events import DeviceEvent\n"
        "from apps.devices.models import Device\n"
        "from apps.forwarding import outbox, tasks\n"
        "tasks.kick = lambda force=False: None  # workers start later, on purpose\n"
        f"devices = list(Device.objects.filter(device_id__startswith='{prefix}-'))\n"
        f"for start in range(0, {count}, 1000):\n"
        "    now = timezone.now()\n"
        f"    events = [DeviceEvent(event_id=f'{prefix}_{{i}}', type='telemetry',"
        " owner_id=d.owner_id, device_pk=d.pk, device_id=d.device_id, device_name='',"
        " profile=d.profile, ts=now, received_at=now,"
        " data={'voltage': 750.0, 'power': float(i)}, seq=i)"
        f" for i in range(start, min(start + 1000, {count}))"
        " for d in [devices[i % len(devices)]]]\n"
        "    with transaction.atomic():\n"
        "        outbox.write_outbox(events)\n",
    )


def kick(env: dict[str, str]) -> datetime:
    # One drain task per worker process: each runs its own loop on disjoint rows.
    return datetime.fromtimestamp(send_drain_tasks(env, WORKERS), UTC)


def wait_rows(targets: Targets, engine: str, prefix: str, total: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = targets.count(engine, prefix)
        if n >= total:
            return n
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > 30:
            break  # stalled
        time.sleep(0.2)
    return targets.count(engine, prefix)


# --- phases -------------------------------------------------------------------------------------


def backlog_phase(env: dict, queue: str, targets: Targets, engine: str, prefix: str) -> dict:
    name = "pg" if engine == "postgres" else "maria"
    enable(env, name)
    fill_backlog(env, BACKLOG, prefix)
    # A queue of its own: no drain task left over from an earlier phase starts it early.
    env = {**env, "DELIVERY_QUEUE": f"{queue}-{prefix}"}
    workers = spawn_celery_workers(env, env["DELIVERY_QUEUE"], WORKERS)
    try:
        time.sleep(3)  # worker start-up
        databases = [env["DATABASE_URL"].rsplit("/", 1)[1], targets.name]
        cpu0, pg0 = tree_cpu(workers.pid), pg_backends(databases=databases)
        t0 = kick(env)
        got = wait_rows(targets, engine, prefix, BACKLOG, timeout=600)
        cpu, pg1 = tree_cpu(workers.pid) - cpu0, pg_backends(databases=databases)
        pg_cpu = sum(seconds - pg0.get(pid, 0.0) for pid, seconds in pg1.items())
        n, first, last = targets.span(engine, prefix)
        time.sleep(2)  # let the workers record the last results before they are stopped
    finally:
        stop_group(workers)
    # From the kick to the last row committed in the target (the first batch's wait included).
    start = min(t0, first) if first else t0
    rate = n / (last - start).total_seconds() if last else 0.0
    log(f"backlog {engine}: {got}/{BACKLOG} at {rate:.0f} rows/s")
    return {
        f"backlog_{name}_rows": got,
        f"backlog_{name}_per_s": round(rate),
        # Independent of what else the machine runs: the workers' own CPU per 1,000 rows.
        f"backlog_{name}_worker_cpu_ms_per_1000": round(cpu / max(got, 1) * 1e6),
        # PostgreSQL backends of the platform's and the owner's databases (MariaDB's own
        # server threads are not included).
        f"backlog_{name}_postgres_cpu_ms_per_1000": round(pg_cpu / max(got, 1) * 1e6),
    }


# The outbox's events, one row each: a database destination's row carries a list of them.
OUTBOX_EVENTS = (
    "forwarding_delivery d, jsonb_array_elements(CASE jsonb_typeof(d.payload::jsonb)"
    " WHEN 'array' THEN d.payload::jsonb ELSE jsonb_build_array(d.payload::jsonb) END) e"
)


def settle_databases(env: dict[str, str]) -> float:
    """VACUUM the platform's outbox (what autovacuum would do during the next phase), then
    wait for a quiet machine (`settle`)."""
    import psycopg

    url = env["DATABASE_URL"].replace("postgres://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as platform:
        platform.execute("VACUUM (ANALYZE) forwarding_delivery")
    return settle()


def telemetry_high_water(platform) -> int:
    # Only this phase's meters publish while it runs: new telemetry ids are its messages. A
    # count(*) over telemetry every second cost this busy machine ~5% of its CPU.
    return platform.execute("SELECT coalesce(max(id), 0) FROM devices_telemetry").fetchone()[0]


def fast_phase(env: dict, mqtt_url: str, targets: Targets, parts: dict) -> dict:
    """FAST_EVENTS offered at FAST_RATE/s into PostgreSQL: the listeners ingest as fast as they
    can; does delivery keep up with them (the delivery backlog stays bounded)?

    `parts`: what CPU to account per event (CpuMeter), measured from a quarter to nine tenths
    of the events ingested: the rate alone drifts with the shared machine's speed."""
    import psycopg

    enable(env, "pg")
    prefix = "fp"
    n = FAST_EVENTS
    platform = psycopg.connect(env["DATABASE_URL"].replace("postgres://", "postgresql://", 1))
    platform.autocommit = True
    # A running fleet: every meter has spoken before (a meter's first message ever costs the
    # listener more, as bench-ingest explains). Events published from `since` on are measured.
    publish_meters(mqtt_url, DEVICES, 2000, prefix, DEVICES).wait(60)
    wait_rows(targets, "postgres", prefix, DEVICES, timeout=60)
    since = datetime.now(UTC)
    base = telemetry_high_water(platform)
    (destination,) = platform.execute(
        "SELECT id FROM forwarding_destination WHERE name = 'pg'"
    ).fetchone()
    t0 = time.monotonic()
    pub = publish_meters(mqtt_url, n, FAST_RATE, prefix, DEVICES, first_seq=2)
    meter = CpuMeter(
        {
            **parts,
            "publisher": lambda: tree_cpu(pub.pid),
            "owner_db": lambda: pg_backend_cpu(databases=[targets.name]),
        }
    )
    samples: list[tuple[float, int, int]] = []  # (s, ingested, delivery backlog)
    while True:
        got = telemetry_high_water(platform) - base
        if n // 4 <= got < n * 0.9:
            meter.mark(got)
        # Sinks claim by row lock: their rows stay 'pending' until written (the due index).
        backlog = platform.execute(
            "SELECT coalesce(sum(events), 0) FROM forwarding_delivery"
            " WHERE destination_id = %s AND status = 'pending'",
            (destination,),
        ).fetchone()[0]
        samples.append((time.monotonic() - t0, got, backlog))
        if got >= n or time.monotonic() - t0 > 600:
            break
        if len(samples) > 30 and samples[-30][1] == got:
            break  # the listener stalled: report what happened
        time.sleep(1.0)
    pub.wait(60)
    written = wait_rows(targets, "postgres", prefix, DEVICES + n, timeout=120) - DEVICES
    # Both rates count from the first publish (the events' own "ts"), as bench-ingest does:
    # to the listeners' last outbox commit, and to the last row committed in the target.
    first_publish, last_outbox = platform.execute(
        f"SELECT min((e->>'ts')::timestamptz), max(d.created_at) FROM {OUTBOX_EVENTS}"
        " WHERE e->'device'->>'id' LIKE %s AND d.created_at >= %s",
        (f"{prefix}-%", since),
    ).fetchone()
    platform.close()
    last = targets.last_committed("postgres", prefix)
    ingest_s = (last_outbox - first_publish).total_seconds() if last_outbox else 0
    write_s = (last - first_publish).total_seconds() if last and first_publish else 0
    backlogs = [b for _s, _i, b in samples]
    # The second half of the samples: the rate once the broker's queue and the listeners'
    # batches have settled, and whether the backlog grows over it.
    half = samples[len(samples) // 2 :]
    late_rate = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) if len(half) > 1 else 0
    trace = [(round(t, 1), i, b) for t, i, b in samples]
    log(f"fast: {samples[-1][1]}/{n} ingested in {ingest_s:.1f}s; (s, ingested, backlog) {trace}")
    return {
        "fast_offered_per_s": FAST_RATE,
        "fast_events": n,
        "fast_ingested_per_s": round(samples[-1][1] / ingest_s) if ingest_s > 0 else None,
        "fast_ingested_per_s_second_half": round(late_rate),
        "fast_written": written,
        "fast_written_per_s": round(written / write_s) if write_s > 0 else None,
        "fast_backlog_max": max(backlogs),
        "fast_backlog_mean": round(sum(backlogs) / len(backlogs)),
        "fast_backlog_end": backlogs[-1],
        "fast_cpu_us_per_event": meter.per_event_us(),
    }


def steady_phase(env: dict, mqtt_url: str, targets: Targets) -> dict:
    enable(env, "pg", "maria")
    prefix = "sp"
    n = STEADY_RATE * STEADY_SECONDS
    pub = publish_meters(mqtt_url, n, STEADY_RATE, prefix, DEVICES)
    pub.wait(STEADY_SECONDS + 60)
    figures: dict = {"steady_offered_per_s": STEADY_RATE, "steady_events": n}
    for engine, name in (("postgres", "pg"), ("mysql", "maria")):
        got = wait_rows(targets, engine, prefix, n, timeout=60)
        latencies = targets.latencies_ms(engine, prefix)
        figures.update(
            {
                f"steady_{name}_written": got,
                f"steady_{name}_p50_ms": round(percentile(latencies, 50), 1),
                f"steady_{name}_p99_ms": round(percentile(latencies, 99), 1),
            }
        )
    figures.update(stages(env, prefix))
    log(f"steady: {figures}")
    return figures


def stages(env: dict, prefix: str) -> dict:
    """Where the time goes: publish -> outbox row (the listener's commit) and outbox row ->
    marked delivered (claim, buffer, write, record), from the platform's own rows."""
    import psycopg

    with psycopg.connect(env["DATABASE_URL"].replace("postgres://", "postgresql://", 1)) as c:
        rows = c.execute(
            "SELECT extract(epoch FROM d.created_at - (e->>'ts')::timestamptz) * 1000,"
            " extract(epoch FROM d.delivered_at - d.created_at) * 1000"
            f" FROM {OUTBOX_EVENTS}"
            " WHERE e->'device'->>'id' LIKE %s AND d.delivered_at IS NOT NULL",
            (f"{prefix}-%",),
        ).fetchall()
    ingest = [float(r[0]) for r in rows]
    delivery = [float(r[1]) for r in rows]
    return {
        "steady_ingest_p50_ms": round(percentile(ingest, 50), 1),
        "steady_ingest_p99_ms": round(percentile(ingest, 99), 1),
        "steady_outbox_to_delivered_p50_ms": round(percentile(delivery, 50), 1),
        "steady_outbox_to_delivered_p99_ms": round(percentile(delivery, 99), 1),
    }


def main() -> None:
    queue = f"bench-dbsink-{uuid.uuid4().hex[:6]}"
    targets = Targets()
    figures: dict = {
        "bench": "dbsink",
        "small": SMALL,
        "workers": WORKERS,
        "listeners": LISTENERS,
        "live": LIVE,
        "batch_size": BATCH,
    }
    try:
        if "raw" in PHASES:
            figures.update(targets.raw_rates())
        with mosquitto() as mqtt_url, postgres_database("bench_dbsink") as database_url:
            env = platform_env(
                database_url,
                MQTT_URL=mqtt_url,
                MQTT_PROTOCOL="5",
                CELERY_BROKER_URL=f"{REDIS_URL}/14",
                DELIVERY_QUEUE=queue,
                EGRESS_ALLOW="127.0.0.1/32",
                # Operator caps far above what this machine can write: measure the pipeline.
                DELIVERY_DESTINATION_RATE="100000",
                DELIVERY_OWNER_RATE="100000",
            )
            setup(env, targets, ["bp", "bm", "fp", "sp"])
            if "backlog" in PHASES:
                figures.update(backlog_phase(env, queue, targets, "postgres", "bp"))
                figures.update(backlog_phase(env, queue, targets, "mysql", "bm"))

            # PGAPPNAME (libpq): the CPU of each one's PostgreSQL backends is told apart.
            workers = spawn_celery_workers({**env, "PGAPPNAME": "bench-worker"}, queue, WORKERS)
            listen_env = {
                **env,
                "MQTT_SHARED_GROUP": "bench" if LISTENERS > 1 else "",
                "PGAPPNAME": "bench-listener",
            }
            listeners = [
                spawn_manage(
                    "mqtt_listen",
                    *listen_args(),
                    "--client-id",
                    f"bench-dbsink-listener-{n}",
                    env=listen_env,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                for n in range(LISTENERS)
            ]
            try:
                time.sleep(4)  # start-up and subscriptions
                if "backlog" in PHASES:
                    # 200,000 upserts and outbox updates just now: let the databases' cleanup
                    # of old row versions finish before measuring CPU per event.
                    figures["settled_s"] = settle_databases(env)
                if "fast" in PHASES:
                    parts = {
                        "listeners": lambda: tree_cpu(*(p.pid for p in listeners)),
                        "listener_pg": lambda: pg_backend_cpu(application="bench-listener"),
                        "mosquitto": lambda: tree_cpu(MOSQUITTO_PIDS[mqtt_url]),
                        "workers": lambda: tree_cpu(workers.pid),
                        "worker_pg": lambda: pg_backend_cpu(application="bench-worker"),
                    }
                    figures.update(fast_phase(env, mqtt_url, targets, parts))
                    time.sleep(2)
                if "steady" in PHASES:
                    figures.update(steady_phase(env, mqtt_url, targets))
            finally:
                for listener in listeners:
                    listener.send_signal(signal.SIGTERM)
                for listener in listeners:
                    listener.wait(30)
                stop_group(workers)
            if {"raw", "backlog"} <= PHASES:
                figures["backlog_pg_ratio_to_raw_upsert"] = round(
                    figures["backlog_pg_per_s"] / figures["raw_pg_upsert_per_s"], 3
                )
                figures["backlog_maria_ratio_to_raw_upsert"] = round(
                    figures["backlog_maria_per_s"] / figures["raw_maria_upsert_per_s"], 3
                )
    finally:
        targets.close()
    must = {}
    if "backlog" in PHASES:
        must["the backlogs were drained"] = (
            figures["backlog_pg_rows"] == figures["backlog_maria_rows"] == BACKLOG
        )
    if "fast" in PHASES:
        must["every fast event was written"] = figures["fast_written"] == FAST_EVENTS
    if "steady" in PHASES:
        n = figures["steady_events"]
        must["every steady event was written"] = (
            figures["steady_pg_written"] == figures["steady_maria_written"] == n
        )
    emit(figures, must)


if __name__ == "__main__":
    main()
