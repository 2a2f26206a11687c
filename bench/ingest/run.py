"""bench-ingest: simulated meters -> Mosquitto -> mqtt_listen -> PostgreSQL.

Measured in one run, on a private Mosquitto and a fresh PostgreSQL database:
  * raw: how fast ONE plain paho subscriber receives the same messages (QoS 0 and QoS 1);
  * burst: N messages published as fast as possible; committed messages/s, loss;
  * steady: a fixed offered rate (1,000/s); publish->commit latency p50/p99 and the listener's
    CPU seconds per 1,000 messages.
Full size by default; BENCH_SMALL=1 for CI. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    ROOT,
    SMALL,
    cpu_seconds,
    emit,
    log,
    mosquitto,
    percentile,
    platform_env,
    postgres_database,
    spawn_manage,
)

DEVICES = 100 if SMALL else 1000
BURST = 4000 if SMALL else 20000
STEADY_RATE = 1000
STEADY_SECONDS = 5 if SMALL else 20
LISTENERS = int(os.environ.get("BENCH_LISTENERS", "1"))


# --- publisher (runs as a subprocess so it does not share our GIL) ----------------------------


def publish(url: str, count: int, qos: int, rate: float, prefix: str, devices: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    u = urlparse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    client.connect(u.hostname, u.port)
    client.loop_start()
    seqs = [0] * devices
    start = time.perf_counter()
    last = None
    for i in range(count):
        d = i % devices
        seqs[d] += 1
        body = {
            "v": 2,
            "seq": seqs[d],
            "msg_type": "telemetry",
            "ts": datetime.now(UTC).isoformat(),
            "device_type": "power_meter_dc",
            "data": {
                "voltage": 750.0 + (i % 7),
                "current": 120.5,
                "power": 90360.0,
                "energy": 1234.5,
            },
        }
        last = client.publish(f"iot/{prefix}-{d}/telemetry", json.dumps(body), qos=qos)
        if rate:
            target = start + (i + 1) / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elif qos and i % 500 == 0:
            last.wait_for_publish(30)
    if last is not None:
        last.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def spawn_publisher(url: str, count: int, qos: int, rate: float, prefix: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--publish",
            url,
            str(count),
            str(qos),
            str(rate),
            prefix,
            str(DEVICES),
        ],
        cwd=ROOT,
    )


# --- raw baseline ---------------------------------------------------------------------------


def raw_rate(url: str, qos: int) -> float:
    """Messages/s one plain paho subscriber receives for a burst of BURST messages."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    u = urlparse(url)
    prefix = f"raw{qos}"
    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal got, first, last
        got += 1
        last = time.perf_counter()
        if got == 1:
            first = last
        if got == BURST:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{qos}")
    sub.on_message = on_message
    sub.connect(u.hostname, u.port)
    sub.subscribe("iot/+/telemetry", qos=qos)
    sub.loop_start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    pub = spawn_publisher(url, BURST, qos, 0, prefix)
    done.wait(120)
    pub.wait(120)
    sub.loop_stop()
    sub.disconnect()
    elapsed = (last - t0) if got else float("inf")
    log(f"raw qos{qos}: {got}/{BURST} in {elapsed:.2f}s")
    return got / elapsed


# --- the platform ---------------------------------------------------------------------------


class CommitWatcher:
    """Polls the telemetry table; records when each new row became visible (commit time).

    Several listener copies commit concurrently, so ids do not become visible in order. The
    watcher asks for rows above `low`, the id below which everything has been seen; a hole
    that stays open for HOLE_SECONDS is a gap in the sequence (not a late commit) and skipped.
    """

    HOLE_SECONDS = 2.0

    def __init__(self, database_url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(
            database_url.replace("postgres://", "postgresql://", 1), autocommit=True
        )
        self.low = 0
        self.seen: set[int] = set()
        self.hole_since: float | None = None
        self.latencies: list[float] = []
        self.count = 0

    def poll(self) -> int:
        now = datetime.now(UTC)
        rows = self.conn.execute(
            "SELECT id, ts FROM devices_telemetry WHERE id > %s", (self.low,)
        ).fetchall()
        new = 0
        for row_id, ts in rows:
            if row_id in self.seen:
                continue
            self.seen.add(row_id)
            self.latencies.append((now - ts).total_seconds() * 1000)
            new += 1
        self.count += new
        while self.low + 1 in self.seen:
            self.low += 1
            self.seen.discard(self.low)
        if self.seen:
            if self.hole_since is None:
                self.hole_since = time.perf_counter()
            elif time.perf_counter() - self.hole_since > self.HOLE_SECONDS:
                self.low = min(self.seen) - 1
                self.hole_since = None
        else:
            self.hole_since = None
        return new

    def wait_for(self, total: int, timeout: float) -> float:
        """Poll until `total` rows are visible; returns the time of the last new row."""
        deadline = time.perf_counter() + timeout
        last_seen = time.perf_counter()
        while self.count < total and time.perf_counter() < deadline:
            if self.poll():
                last_seen = time.perf_counter()
            time.sleep(0.01)
        return last_seen

    def reset(self) -> None:
        self.latencies = []
        self.count = 0


def create_devices(env: dict[str, str], prefixes: list[str]) -> None:
    code = (
        "from apps.owners.models import Owner\n"
        "from apps.devices.models import Device\n"
        "o, _ = Owner.objects.get_or_create(slug='bench', defaults={'name': 'Bench'})\n"
        f"for p in {prefixes!r}:\n"
        "    Device.objects.bulk_create([Device(owner=o, device_id=f'{p}-{i}', topic=f'{p}-{i}',"
        f" profile='meter-v2', expected_interval=3600) for i in range({DEVICES})])\n"
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True
    )


def _follow(proc: subprocess.Popen, connected: threading.Event) -> None:
    """Read a listener's log: note when it has connected; echo it with BENCH_DEBUG=1."""
    for line in proc.stderr:
        if b"event=connected" in line:
            connected.set()
        if os.environ.get("BENCH_DEBUG"):
            sys.stderr.write(line.decode(errors="replace"))


def platform_run(mqtt_url: str, database_url: str, qos: int, watcher: CommitWatcher, prefix: str):
    env = platform_env(
        database_url,
        MQTT_URL=mqtt_url,
        MQTT_PROTOCOL="5",
        MQTT_SHARED_GROUP="bench" if LISTENERS > 1 else "",
    )
    env["LOG_LEVEL"] = "INFO"
    listeners = [
        spawn_manage(
            "mqtt_listen",
            "--no-live",
            "--client-id",
            # Stable ids: a copy that restarts resumes its session (and its share of messages).
            f"bench-listener-{n}",
            env=env,
            stderr=subprocess.PIPE,
        )
        for n in range(LISTENERS)
    ]
    connected = [threading.Event() for _ in listeners]
    for proc, event in zip(listeners, connected, strict=True):
        threading.Thread(target=_follow, args=(proc, event), daemon=True).start()
    try:
        for event in connected:
            if not event.wait(120):
                raise RuntimeError("a listener did not connect")
        time.sleep(0.5)  # SUBACK
        watcher.reset()
        t0 = time.perf_counter()
        pub = spawn_publisher(mqtt_url, BURST, qos, 0, f"{prefix}b")
        last = watcher.wait_for(BURST, timeout=180)
        pub.wait(60)
        burst_rate = watcher.count / (last - t0)
        burst_count = watcher.count
        time.sleep(1)
        watcher.poll()
        lost = BURST - watcher.count
        log(f"platform qos{qos} burst: {watcher.count}/{BURST} at {burst_rate:.0f}/s")

        steady = {}
        if qos == 1:
            watcher.reset()
            cpu0 = sum(cpu_seconds(p.pid) for p in listeners)
            t0 = time.perf_counter()
            n = STEADY_RATE * STEADY_SECONDS
            pub = spawn_publisher(mqtt_url, n, qos, STEADY_RATE, f"{prefix}s")
            watcher.wait_for(n, timeout=STEADY_SECONDS + 60)
            pub.wait(60)
            wall = time.perf_counter() - t0
            cpu = sum(cpu_seconds(p.pid) for p in listeners) - cpu0
            steady = {
                "steady_offered_per_s": STEADY_RATE,
                "steady_committed": watcher.count,
                "steady_p50_ms": round(percentile(watcher.latencies, 50), 1),
                "steady_p99_ms": round(percentile(watcher.latencies, 99), 1),
                "listener_cpu_s_per_1000": round(cpu / n * 1000, 3),
                "listener_cores_at_1000_per_s": round(cpu / wall, 3),
            }
            log(f"platform steady: {steady}")
        return burst_rate, burst_count, lost, steady
    finally:
        for p in listeners:
            p.send_signal(signal.SIGTERM)
        for p in listeners:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    with mosquitto() as mqtt_url, postgres_database("bench_ingest") as database_url:
        raw0 = raw_rate(mqtt_url, 0)
        raw1 = raw_rate(mqtt_url, 1)
        env = platform_env(database_url)
        create_devices(env, ["q0b", "q1b", "q1s"])
        watcher = CommitWatcher(database_url)
        rate0, got0, lost0, _ = platform_run(mqtt_url, database_url, 0, watcher, "q0")
        rate1, got1, lost1, steady = platform_run(mqtt_url, database_url, 1, watcher, "q1")
    emit(
        {
            "bench": "ingest",
            "small": SMALL,
            "listeners": LISTENERS,
            "devices": DEVICES,
            "burst": BURST,
            "raw_qos0_per_s": round(raw0),
            "raw_qos1_per_s": round(raw1),
            "qos0_committed_per_s": round(rate0),
            "qos1_committed_per_s": round(rate1),
            "qos0_ratio_to_raw": round(rate0 / raw0, 3),
            "qos1_ratio_to_raw": round(rate1 / raw1, 3),
            "qos0_lost": lost0,
            "qos1_lost": lost1,
            **steady,
        }
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--publish", nargs=6)
    args = parser.parse_args()
    if args.publish:
        url, count, qos, rate, prefix, devices = args.publish
        publish(url, int(count), int(qos), float(rate), prefix, int(devices))
    else:
        main()
