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
import select
import signal
import socket
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
    LIVE,
    ROOT,
    SMALL,
    cpu_seconds,
    emit,
    listen_args,
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
# Two copies behind a shared subscription: how the platform scales its listener (one copy waits
# for PostgreSQL half the time). BENCH_LISTENERS=1 for one.
LISTENERS = int(os.environ.get("BENCH_LISTENERS", "2"))
# BENCH_STEADY_COLD=1: the steady phase's meters speak for the first time in it (as before
# earlier figures) instead of once each beforehand.
STEADY_COLD = os.environ.get("BENCH_STEADY_COLD") == "1"


# --- publisher (a subprocess: it does not share our GIL) -------------------------------------
#
# A lean load generator: MQTT 3.1.1 PUBLISH packets encoded from a byte template and written to
# a plain socket, many per sendall. A paho publisher took most of a core at burst rates, on the
# same two cores as the system under test. QoS 1: packet ids with a bounded in-flight window,
# PUBACKs counted by the writer between sends. The end of a QoS 0 run is a PINGREQ answered:
# the broker reads a connection in order, so by then it has taken every PUBLISH.
# It reports on stderr, as one line "publisher {json}": start (the first byte of the first
# PUBLISH, time.time()), end, count and its own CPU seconds.

PUBLISH_TICK = 0.001  # s: a paced publisher sends what is due at most this often
PUBLISH_WINDOW = 2000  # QoS 1 messages in flight (unacknowledged)
PUBLISH_CHUNK = 250  # messages per sendall at burst
BODY = (
    b'{"v":2,"seq":%d,"msg_type":"telemetry","ts":"%s","device_type":"power_meter_dc",'
    b'"data":{"voltage":%s,"current":120.5,"power":90360.0,"energy":1234.5}}'
)
VOLTAGES = [b"%.1f" % (750.0 + k) for k in range(7)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    # protocol "MQTT" level 4, clean session, keepalive 60 s
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + _varint(len(body)) + body


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


class _Acks:
    """The broker's packets to this client (PUBACKs, a PINGRESP), read by the writer itself
    between sends, without blocking: a reader thread woken for every arriving chunk cost this
    load generator more CPU (thread hand-offs) than encoding the messages."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buf = b""
        self.acked = 0
        self.pong = False

    def read(self, wait: float = 0.0) -> None:
        """Take what has arrived; with `wait`, first wait up to that long for something."""
        if wait:
            select.select([self.sock], [], [], wait)
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("broker closed the connection")
            self._parse(self.buf + data)
            if len(data) < 65536:
                return

    def _parse(self, buf: bytes) -> None:
        # The usual case, counted in C: nothing but 4-byte PUBACKs (0x40 0x02 id id).
        n = len(buf) // 4
        if n and buf[0 : 4 * n : 4] == b"\x40" * n and buf[1 : 4 * n : 4] == b"\x02" * n:
            self.acked += n
            buf = buf[4 * n :]
        i = 0
        while len(buf) - i >= 2:
            kind, length, j, shift = buf[i], 0, i + 1, 0
            while j < len(buf):
                length |= (buf[j] & 0x7F) << shift
                shift += 7
                j += 1
                if not buf[j - 1] & 0x80:
                    break
            else:
                break
            if len(buf) < j + length:
                break
            if kind >> 4 == 4:
                self.acked += 1
            elif kind >> 4 == 13:
                self.pong = True
            i = j + length
        self.buf = buf[i:]

    def wait(self, predicate, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the broker did not acknowledge in time")
            self.read(wait=0.05)


def publish(
    url: str, count: int, qos: int, rate: float, prefix: str, devices: int, first_seq: int = 1
) -> dict:
    """Publish `count` meter-v2 telemetry messages, `ts` = the time each was sent (ms), to
    `devices` meters in turn, each meter's `seq` counting from `first_seq`."""
    import resource

    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_connect_packet(f"bench-pub-{uuid.uuid4().hex[:8]}"))
    connack = _recv_exact(sock, 4)
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"CONNACK refused: {connack!r}")
    acks = _Acks(sock)

    topics = [f"iot/{prefix}-{d}/telemetry".encode() for d in range(devices)]
    topic_fields = [len(t).to_bytes(2, "big") + t for t in topics]
    first_byte = bytes([0x30 | (qos << 1)])
    seqs = [first_seq - 1] * devices

    def encode(lo: int, hi: int) -> bytes:
        ts = datetime.now(UTC).isoformat().encode()
        parts = []
        for i in range(lo, hi):
            d = i % devices
            seqs[d] += 1
            body = BODY % (seqs[d], ts, VOLTAGES[i % 7])
            head = topic_fields[d]
            if qos:
                head += (i % 65535 + 1).to_bytes(2, "big")
            parts += (first_byte, _varint(len(head) + len(body)), head, body)
        return b"".join(parts)

    def send(lo: int, hi: int) -> None:
        acks.read()
        if qos:
            acks.wait(lambda: hi - acks.acked <= PUBLISH_WINDOW)
        sock.sendall(encode(lo, hi))

    start = time.time()
    t0 = time.perf_counter()
    sent = 0
    while sent < count:
        if rate:
            due = min(count, int((time.perf_counter() - t0) * rate) + 1)
            if due <= sent:
                # At least a tick: a fleet's messages go out in small bursts instead of one
                # send (and one wake-up) per message, which cost this load generator ~60 us
                # of CPU per message at 8,000/s, on the platform's cores.
                time.sleep(max(PUBLISH_TICK, t0 + sent / rate - time.perf_counter()))
                continue
            hi = min(due, sent + PUBLISH_CHUNK)
        else:
            hi = min(count, sent + PUBLISH_CHUNK)
        send(sent, hi)
        sent = hi
    if qos:
        acks.wait(lambda: acks.acked >= count)
    else:
        sock.sendall(b"\xc0\x00")  # PINGREQ
        acks.wait(lambda: acks.pong)
    end = time.time()
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "count": count,
        "qos": qos,
        "start": start,
        "end": end,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
    }


class Publisher:
    """The publisher subprocess; `report()` waits for it and returns what it measured."""

    def __init__(
        self, url: str, count: int, qos: int, rate: float, prefix: str, first_seq: int = 1
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--publish", url, str(count), str(qos), str(rate),
             prefix, str(DEVICES), str(first_seq)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def report(self, timeout: float = 120) -> dict:
        _, err = self.proc.communicate(timeout=timeout)
        for line in err.decode(errors="replace").splitlines():
            if line.startswith("publisher "):
                return json.loads(line.split(" ", 1)[1])
            log(line)
        raise RuntimeError(f"the publisher failed (exit {self.proc.returncode})")

    def started(self, report: dict) -> float:
        """The first publish, on this process's perf_counter clock."""
        return report["start"] - time.time() + time.perf_counter()


# --- raw baseline ---------------------------------------------------------------------------


def raw_rate(url: str, qos: int) -> tuple[float, float]:
    """Messages/s one plain paho subscriber receives of a BURST, from the first publish; and the
    rate the publisher alone sent (QoS 0) or had acknowledged (QoS 1)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    u = urlparse(url)
    prefix = f"raw{qos}"
    got = 0
    last = 0.0
    done = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal got, last
        got += 1
        last = time.perf_counter()
        if got == BURST:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{qos}")
    sub.on_message = on_message
    sub.connect(u.hostname, u.port)
    sub.subscribe("iot/+/telemetry", qos=qos)
    sub.loop_start()
    time.sleep(0.5)
    pub = Publisher(url, BURST, qos, 0, prefix)
    report = pub.report()
    t0 = pub.started(report)
    done.wait(120)
    sub.loop_stop()
    sub.disconnect()
    elapsed = (last - t0) if got else float("inf")
    sent_rate = BURST / (report["end"] - report["start"])
    log(
        f"raw qos{qos}: {got}/{BURST} in {elapsed:.2f}s; publisher {sent_rate:.0f}/s, "
        f"{report['cpu_s']:.2f} CPU-s"
    )
    return got / elapsed, sent_rate


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
            *listen_args(),
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
        cpu0 = sum(cpu_seconds(p.pid) for p in listeners)
        pub = Publisher(mqtt_url, BURST, qos, 0, f"{prefix}b")
        last = watcher.wait_for(BURST, timeout=180)
        t0 = pub.started(pub.report(60))
        burst_rate = watcher.count / (last - t0)
        burst_cpu = (sum(cpu_seconds(p.pid) for p in listeners) - cpu0) / BURST * 1000
        time.sleep(1)
        watcher.poll()
        lost = BURST - watcher.count
        log(
            f"platform qos{qos} burst: {watcher.count}/{BURST} at {burst_rate:.0f}/s, "
            f"listener {burst_cpu:.3f} CPU-s per 1,000"
        )

        steady = {}
        if qos == 1:
            first_seq = 1
            if not STEADY_COLD:
                # A running fleet: every meter has spoken before. A meter's first message ever
                # costs more (a connection transition, its device type written, its row and
                # instance loaded): a thousand of them at once is not the steady state.
                watcher.reset()
                Publisher(mqtt_url, DEVICES, qos, STEADY_RATE, f"{prefix}s").report(60)
                watcher.wait_for(DEVICES, timeout=60)
                first_seq = 2
            watcher.reset()
            cpu0 = sum(cpu_seconds(p.pid) for p in listeners)
            n = STEADY_RATE * STEADY_SECONDS
            pub = Publisher(mqtt_url, n, qos, STEADY_RATE, f"{prefix}s", first_seq)
            watcher.wait_for(n, timeout=STEADY_SECONDS + 60)
            wall = time.perf_counter() - pub.started(pub.report(60))
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
        return burst_rate, burst_cpu, lost, steady
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
        raw0, sent0 = raw_rate(mqtt_url, 0)
        raw1, sent1 = raw_rate(mqtt_url, 1)
        env = platform_env(database_url)
        create_devices(env, ["q0b", "q1b", "q1s"])
        watcher = CommitWatcher(database_url)
        rate0, cpu0, lost0, _ = platform_run(mqtt_url, database_url, 0, watcher, "q0")
        rate1, cpu1, lost1, steady = platform_run(mqtt_url, database_url, 1, watcher, "q1")
    emit(
        {
            "bench": "ingest",
            "small": SMALL,
            "steady_cold": STEADY_COLD,
            "listeners": LISTENERS,
            "live": LIVE,
            "devices": DEVICES,
            "burst": BURST,
            "publisher_qos0_per_s": round(sent0),
            "publisher_qos1_per_s": round(sent1),
            "raw_qos0_per_s": round(raw0),
            "raw_qos1_per_s": round(raw1),
            "qos0_committed_per_s": round(rate0),
            "qos1_committed_per_s": round(rate1),
            "qos0_ratio_to_raw": round(rate0 / raw0, 3),
            "qos1_ratio_to_raw": round(rate1 / raw1, 3),
            "qos0_listener_cpu_s_per_1000": round(cpu0, 3),
            "qos1_listener_cpu_s_per_1000": round(cpu1, 3),
            "qos0_lost": lost0,
            "qos1_lost": lost1,
            **steady,
        },
        # QoS 0 may lose messages under overload by design; QoS 1 may not.
        must={
            "no QoS 1 message was lost": lost1 == 0,
            "every steady message was committed": steady["steady_committed"]
            >= STEADY_RATE * STEADY_SECONDS,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    # url count qos rate prefix devices [first_seq] (bench-dbsink and bench-webhooks use it too)
    parser.add_argument("--publish", nargs="+")
    args = parser.parse_args()
    if args.publish:
        url, count, qos, rate, prefix, devices, *first_seq = args.publish
        report = publish(
            url, int(count), int(qos), float(rate), prefix, int(devices), int(*first_seq or [1])
        )
        print("publisher", json.dumps(report), file=sys.stderr, flush=True)
    else:
        main()
