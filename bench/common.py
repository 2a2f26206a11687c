"""Shared parts of the benchmarks in bench/: each starts what it needs and cleans up after.

Conventions (docs/performance.md): full size by default, small with BENCH_SMALL=1; a raw baseline
measured in the same run; the last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = os.environ.get("BENCH_SMALL") == "1"
PG_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# The listeners push to live pages as in production: the Redis channel layer, and a shared
# cache, in which no page marks a group as watched (so nothing is sent: see apps.devices.live).
# BENCH_LIVE=0: they do not push at all (`mqtt_listen --no-live`).
LIVE = os.environ.get("BENCH_LIVE", "1") == "1"


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(figures: dict, must: dict[str, bool] | None = None) -> None:
    """The benchmark's result: always the last line on stdout. `must`: what has to hold for the
    figures to mean anything (every event delivered, none lost, every signature valid); when
    one does not, the benchmark says which and exits 1 (CI fails on it), after the figures.
    Rates are never checked here: a shared machine's speed is not a failure."""
    print(json.dumps(figures, sort_keys=True), flush=True)
    broken = [name for name, held in (must or {}).items() if not held]
    if broken:
        log(f"the run measured nothing valid: {', '.join(broken)}")
        sys.exit(1)


# --- CPU accounting ---------------------------------------------------------------------------
# On a shared two-core machine rates drift from run to run; CPU per event by part does much less,
# and says where the time goes.

MOSQUITTO_PIDS: dict[str, int] = {}  # URL -> pid of the private broker serving it


def _proc_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return found


def tree_cpu(*pids: int) -> float:
    """User + system CPU seconds of processes and their live descendants (Celery's prefork
    children are alive while measured, so /proc's cutime would miss them)."""
    stats = _proc_cpu()
    total, todo = 0.0, list(pids)
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo.extend(child for child, (parent, _cpu) in stats.items() if parent == current)
    return total


def pg_backends(*, databases: list[str] | None = None, application: str | None = None) -> dict:
    """pid -> CPU seconds of the PostgreSQL backends serving `databases` or `application` (the
    client's `application_name`; libpq takes it from PGAPPNAME)."""
    import psycopg

    admin = PG_ADMIN_URL.replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        if databases is not None:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (databases,)
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application,)
            ).fetchall()
    stats = _proc_cpu()
    return {pid: stats[pid][1] for (pid,) in rows if pid in stats}


def pg_backend_cpu(*, databases: list[str] | None = None, application: str | None = None) -> float:
    """Their CPU seconds together (a backend that ended meanwhile is no longer counted)."""
    return sum(pg_backends(databases=databases, application=application).values())


def machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine, all cores (from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def settle(max_wait: float = 60.0, busy_below: float = 0.3) -> float:
    """Wait until the machine is quiet: less than `busy_below` cores busy over a second (or
    `max_wait` seconds passed). A phase that follows heavy writes would otherwise share the
    cores with their aftermath (autovacuum, InnoDB's purge of old row versions). Returns the
    seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        before = machine_busy()
        time.sleep(1.0)
        if machine_busy() - before < busy_below:
            break
    return round(time.monotonic() - start, 1)


class CpuMeter:
    """CPU seconds of named parts between a first and a last mark, per event.

    `parts`: name -> a function giving that part's CPU seconds so far. The machine's total is
    always measured too, and "other" is what no part accounts for (Redis, the kernel, the
    benchmark's own sampling, anything else running)."""

    def __init__(self, parts: dict) -> None:
        self.parts = {**parts, "machine": machine_busy}
        self.first: tuple[int, dict[str, float]] | None = None
        self.last: tuple[int, dict[str, float]] | None = None

    def mark(self, events: int) -> None:
        """The first call marks the start; each later one moves the end."""
        snapshot = (events, {name: read() for name, read in self.parts.items()})
        if self.first is None:
            self.first = snapshot
        else:
            self.last = snapshot

    def per_event_us(self) -> dict[str, float] | None:
        """Microseconds of CPU per event between the marks, by part."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        (n0, a), (n1, b) = self.first, self.last
        out = {name: round((b[name] - a[name]) / (n1 - n0) * 1e6, 1) for name in a}
        out["other"] = round(out["machine"] - sum(v for k, v in out.items() if k != "machine"), 1)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"process for port {port} exited with {proc.returncode}"
                ) from None
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def mosquitto() -> Iterator[str]:
    """A private Mosquitto (no other traffic; unlimited queues so nothing is dropped)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("this benchmark needs Mosquitto (apt-get install mosquitto)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_inflight_messages 0\nmax_packet_size 70000\n"
        )
        proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
        url = f"mqtt://127.0.0.1:{port}"
        MOSQUITTO_PIDS[url] = proc.pid
        try:
            wait_port(port, proc)
            yield url
        finally:
            MOSQUITTO_PIDS.pop(url, None)
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new, migrated PostgreSQL database for the platform, dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = PG_ADMIN_URL.replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        manage("migrate", "-v0", env=platform_env(url))
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def platform_env(database_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        EMBEDDED="false",
        SECRET_KEY=env.get("SECRET_KEY") or "bench-" + uuid.uuid4().hex,
        FIELD_ENCRYPTION_KEYS=env.get("FIELD_ENCRYPTION_KEYS")
        or "kbench:" + base64.urlsafe_b64encode(os.urandom(32)).decode(),
        CELERY_BROKER_URL=env.get("BENCH_CELERY_BROKER_URL", "memory://"),
        CHANNEL_LAYER_URL=f"{REDIS_URL}/13",
        CACHE_URL=f"{REDIS_URL}/15",
        LOG_LEVEL="WARNING",
        VAR_DIR=env.get("VAR_DIR") or str(Path(tempfile.gettempdir()) / "iot-bench-var"),
    )
    env.update(extra)
    return env


def listen_args() -> list[str]:
    """`mqtt_listen`'s options for LIVE."""
    return [] if LIVE else ["--no-live"]


def manage(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True)


def spawn_manage(*args: str, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=env, **kwargs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def send_drain_tasks(env: dict[str, str], count: int) -> float:
    """Queue `count` `forwarding.drain` tasks through the broker with a bare Celery client, and
    return the time (epoch seconds) they were sent. A `manage.py shell` kick would start Django
    first — one to three seconds here, which would be counted as the pipeline's time."""
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery()
    app.conf.task_serializer = "json"
    name = env["DELIVERY_QUEUE"]
    # The URL given to the connection itself: Celery lets a CELERY_BROKER_URL in this process's
    # environment (a developer's shell, CI) override the app's broker, and the tasks went to
    # another Redis database than the workers' — every drain task lost, nothing measured.
    with app.connection_for_write(env["CELERY_BROKER_URL"]) as conn:
        conn.ensure_connection()
        # Declared here too, as the worker declares it: on Redis a message sent to a queue no
        # one has declared yet (a worker still starting) is dropped without a word.
        Queue(name, Exchange(name, type="direct"), routing_key=name)(conn.default_channel).declare()
        sent = time.time()
        for _ in range(count):
            app.send_task("forwarding.drain", queue=env["DELIVERY_QUEUE"], connection=conn)
    return sent


def spawn_celery_workers(env: dict[str, str], queue: str, workers: int) -> subprocess.Popen:
    """A Celery worker with `workers` prefork processes on `queue`, in a process group of its own
    (`stop_group` ends it and its children)."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "iotplatform", "worker", "-Q", queue,
         "-c", str(workers), "-l", "warning", "-n", f"{queue}@%h",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def publish_meters(
    mqtt_url: str, count: int, rate: float, prefix: str, devices: int, first_seq: int = 1
) -> subprocess.Popen:
    """The ingest benchmark's publisher (QoS 1): meter-v2 telemetry, the publish time in "ts".
    Sequence numbers start at `first_seq` (a later run for the same meters must not repeat
    event ids: the outbox would take them as duplicates)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ingest" / "run.py"), "--publish", mqtt_url,
         str(count), "1", str(rate), prefix, str(devices), str(first_seq)],
        cwd=ROOT,
    )  # fmt: skip
