"""bench-webhooks: simulated meters -> Mosquitto -> mqtt_listen -> outbox -> Celery workers ->
signed POSTs to a fast receiver on loopback. PostgreSQL, Redis (broker + cache), Mosquitto.

Measured in one run, on a private Mosquitto, a fresh PostgreSQL database and a fresh receiver:
  * raw: signed POSTs/s the same receiver takes from a plain aiohttp client (the ceiling);
  * backlog: BACKLOG due deliveries already in the outbox, drained by the workers: deliveries/s;
  * burst: BURST events published as fast as possible (QoS 1) through the whole pipeline:
    deliveries/s sustained at the receiver, lost and duplicated counts;
  * steady: 1,000 events/s offered for STEADY_SECONDS: publish -> received p50/p99.
Every request's signature is verified by the receiver. Full size by default; BENCH_SMALL=1 for
CI. The last line is one JSON object. Needs PostgreSQL, Redis and Mosquitto on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from bench.common import (  # noqa: E402
    LIVE,
    ROOT,
    SMALL,
    cpu_seconds,
    emit,
    free_port,
    listen_args,
    log,
    mosquitto,
    percentile,
    platform_env,
    postgres_database,
    publish_meters,
    send_drain_tasks,
    spawn_celery_workers,
    spawn_manage,
    stop_group,
    tree_cpu,
    wait_port,
)

BACKLOG = 5_000 if SMALL else 50_000
BURST = 5_000 if SMALL else 50_000
RAW = 5_000 if SMALL else 30_000
STEADY_RATE = 1000
STEADY_SECONDS = 5 if SMALL else 20
DEVICES = 100 if SMALL else 1000
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))  # Celery prefork processes
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "64"))  # the destination's concurrent requests
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
SECRET = "whsec_" + "YmVuY2gtc2VjcmV0LWJlbmNoLXNlY3JldC0xMjM0"  # fixed: the receiver verifies
HERE = Path(__file__).resolve().parent


# --- the receiver ----------------------------------------------------------------------------


class ReceiverProc:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "receiver.py"), str(self.port), SECRET]
        )
        wait_port(self.port, self.proc)

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:  # noqa: S310
            return r.read()

    def stats(self) -> dict:
        return json.loads(self._get("/__stats"))

    def reset(self) -> None:
        self._get("/__reset")

    def wait_for(self, unique: int, timeout: float, quiet: float = 5.0) -> dict:
        """Poll until `unique` ids arrived, or nothing new came for `quiet` s after timeout."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            s = self.stats()
            if s["unique"] >= unique:
                return s
            if s["unique"] != last_count:
                last_count, last_change = s["unique"], time.monotonic()
            if time.monotonic() > deadline and time.monotonic() - last_change > quiet:
                return s
            time.sleep(0.25)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def raw_rate(port: int, count: int, connections: int = 32) -> float:
    """Signed POSTs/s from a plain aiohttp client with keep-alive, no platform involved."""
    import aiohttp

    from apps.forwarding.webhook.signing import decode_secret, sign

    key = decode_secret(SECRET)
    url = f"http://127.0.0.1:{port}/raw"

    async def run() -> float:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections)
        ) as session:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(count):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    body = json.dumps({"type": "telemetry", "data": {"n": i}}).encode()
                    ts = int(time.time())
                    msg_id = f"msg_raw_{i}"
                    headers = {
                        "content-type": "application/json",
                        "webhook-id": msg_id,
                        "webhook-timestamp": str(ts),
                        "webhook-signature": sign(key, msg_id, ts, body),
                    }
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            return count / (time.perf_counter() - t0)

    return asyncio.run(run())


# --- the platform ----------------------------------------------------------------------------


def shell(env: dict[str, str], code: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True
    )


def setup(env: dict[str, str], receiver_port: int, prefixes: list[str]) -> None:
    shell(
        env,
        "from apps.owners.models import Owner\n"
        "from apps.devices.models import Device\n"
        "from apps.forwarding.webhook.models import WebhookDestination\n"
        "o, _ = Owner.objects.get_or_create(slug='bench', defaults={'name': 'Bench'})\n"
        f"for p in {prefixes!r}:\n"
        f"    Device.objects.bulk_create([Device(owner=o, device_id=f'{{p}}-{{i}}',"
        f" topic=f'{{p}}-{{i}}', profile='meter-v2', expected_interval=3600)"
        f" for i in range({DEVICES})])\n"
        f"WebhookDestination.objects.create(owner=o, name='bench', secret={SECRET!r},"
        f" url='http://127.0.0.1:{receiver_port}/hook', max_in_flight={IN_FLIGHT},"
        " event_types=['telemetry'])\n",
    )


def fill_backlog(env: dict[str, str], count: int, prefix: str) -> None:
    """`count` due deliveries through the real write_outbox, as the listener would write them."""
    shell(
        env,
        "from django.db import transaction\n"
        "from django.utils import timezone\n"
        "from apps.devices.events import DeviceEvent\n"
        "from apps.devices.models import Device\n"
        "from apps.forwarding import outbox, tasks\n"
        "tasks.kick = lambda force=False: None  # workers start later, on purpose\n"
        f"devices = list(Device.objects.filter(device_id__startswith='{prefix}-'))\n"
        f"for start in range(0, {count}, 500):\n"
        "    now = timezone.now()\n"
        "    events = [DeviceEvent(event_id=f'bl_{i}', type='telemetry', owner_id=d.owner_id,"
        " device_pk=d.pk, device_id=d.device_id, device_name='', profile=d.profile, ts=now,"
        " received_at=now, data={'voltage': 750.0, 'i': i}, seq=i)"
        f" for i in range(start, min(start + 500, {count})) for d in [devices[i % len(devices)]]]\n"
        "    with transaction.atomic():\n"
        "        outbox.write_outbox(events)\n",
    )


def kick(env: dict[str, str]) -> float:
    # One drain task per worker process, sent without starting Django (see send_drain_tasks).
    return send_drain_tasks(env, WORKERS)


def main() -> None:
    queue = f"bench-webhooks-{uuid.uuid4().hex[:6]}"
    receiver = ReceiverProc()
    try:
        with mosquitto() as mqtt_url, postgres_database("bench_webhooks") as database_url:
            env = platform_env(
                database_url,
                MQTT_URL=mqtt_url,
                MQTT_PROTOCOL="5",
                CELERY_BROKER_URL=f"{REDIS}/14",
                CACHE_URL=f"{REDIS}/15",
                DELIVERY_QUEUE=queue,
                EGRESS_ALLOW="127.0.0.1/32",
                WEBHOOK_ALLOW_HTTP="1",
                # Operator caps far above what this machine can send: measure the pipeline.
                DELIVERY_DESTINATION_RATE="100000",
                DELIVERY_OWNER_RATE="100000",
            )
            setup(env, receiver.port, ["bl", "wb", "ws"])

            raw = raw_rate(receiver.port, RAW)
            log(f"raw: {raw:.0f} signed POSTs/s")
            receiver.reset()

            # Backlog drain: the rows are there before any worker runs.
            fill_backlog(env, BACKLOG, "bl")
            workers = spawn_celery_workers(env, queue, WORKERS)
            try:
                time.sleep(3)  # worker start-up
                receiver.reset()
                cpu0 = tree_cpu(workers.pid)
                t0 = kick(env)
                s = receiver.wait_for(BACKLOG, timeout=180)
                worker_cpu = tree_cpu(workers.pid) - cpu0
                drain_rate = s["unique"] / (s["last"] - t0)
                took = s["last"] - t0
                log(f"backlog: {s['unique']}/{BACKLOG} in {took:.1f}s = {drain_rate:.0f}/s")
                drain = {
                    "backlog": BACKLOG,
                    "backlog_drained": s["unique"],
                    "backlog_per_s": round(drain_rate),
                    "backlog_bad_signatures": s["bad_signatures"],
                    # Machine-independent: what the workers spent, whatever else ran.
                    "backlog_worker_cpu_ms_per_delivery": round(
                        worker_cpu / max(s["unique"], 1) * 1000, 3
                    ),
                }

                # End to end: broker -> listener -> outbox -> workers -> receiver.
                listener = spawn_manage(
                    "mqtt_listen", *listen_args(), "--client-id", "bench-webhooks-listener",
                    env=env, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    time.sleep(4)
                    receiver.reset()
                    cpu0 = tree_cpu(workers.pid), cpu_seconds(listener.pid)
                    pub = publish_meters(mqtt_url, BURST, 0, "wb", DEVICES)
                    s = receiver.wait_for(BURST, timeout=300)
                    pub.wait(60)
                    cpu1 = tree_cpu(workers.pid), cpu_seconds(listener.pid)
                    burst_rate = s["unique"] / (s["last"] - s["first"]) if s["unique"] else 0
                    log(f"burst: {s['unique']}/{BURST} at {burst_rate:.0f}/s")
                    burst = {
                        "burst": BURST,
                        "burst_delivered": s["unique"],
                        "burst_per_s": round(burst_rate),
                        "burst_lost": BURST - s["unique"],
                        "burst_duplicates": s["duplicates"],
                        "burst_bad_signatures": s["bad_signatures"],
                        "burst_p50_ms": round(percentile(s["latencies"], 50) * 1000, 1),
                        "burst_p99_ms": round(percentile(s["latencies"], 99) * 1000, 1),
                        "burst_worker_cpu_ms_per_delivery": round(
                            (cpu1[0] - cpu0[0]) / max(s["unique"], 1) * 1000, 3
                        ),
                        "burst_listener_cpu_ms_per_event": round(
                            (cpu1[1] - cpu0[1]) / max(s["unique"], 1) * 1000, 3
                        ),
                    }

                    time.sleep(2)
                    receiver.reset()
                    n = STEADY_RATE * STEADY_SECONDS
                    pub = publish_meters(mqtt_url, n, STEADY_RATE, "ws", DEVICES)
                    s = receiver.wait_for(n, timeout=STEADY_SECONDS + 60)
                    pub.wait(60)
                    steady = {
                        "steady_offered_per_s": STEADY_RATE,
                        "steady_delivered": s["unique"],
                        "steady_lost": n - s["unique"],
                        "steady_p50_ms": round(percentile(s["latencies"], 50) * 1000, 1),
                        "steady_p99_ms": round(percentile(s["latencies"], 99) * 1000, 1),
                    }
                    log(f"steady: {steady}")
                finally:
                    listener.send_signal(signal.SIGTERM)
                    listener.wait(30)
            finally:
                stop_group(workers)
    finally:
        receiver.close()
    load = os.getloadavg()[0]
    emit(
        {
            "bench": "webhooks",
            "small": SMALL,
            "load_average_1m_at_end": round(load, 2),
            "workers": WORKERS,
            "live": LIVE,
            "raw_signed_posts_per_s": round(raw),
            **drain,
            **burst,
            "burst_ratio_to_raw": round(burst["burst_per_s"] / raw, 3),
            **steady,
        },
        must={
            "the backlog was drained": drain["backlog_drained"] == BACKLOG,
            "no burst event was lost": burst["burst_lost"] == 0,
            "no steady event was lost": steady["steady_lost"] == 0,
            "every signature was valid": not (
                drain["backlog_bad_signatures"] or burst["burst_bad_signatures"]
            ),
        },
    )


if __name__ == "__main__":
    main()
