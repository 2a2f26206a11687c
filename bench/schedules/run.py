"""bench-schedules: N devices with schedules due in the same minute, run by the real platform.

Celery beat (DatabaseScheduler) -> two Celery workers -> the schedule runner -> a private
Mosquitto -> a spy subscriber, on a fresh PostgreSQL database. The spy counts commands per
device (published, duplicates, missing) and the lateness of each one: arrival at the spy minus
the planned instant. Baseline, same run and broker: a plain paho client publishing N QoS 1
messages at a planned instant, seen by the same spy.

Full size: 1,000 devices; BENCH_SMALL=1: 100. The last line is one JSON object.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    ROOT,
    SMALL,
    emit,
    log,
    mosquitto,
    percentile,
    platform_env,
    postgres_database,
)

DEVICES = int(os.environ.get("BENCH_DEVICES", 100 if SMALL else 1000))
WORKERS = 2
# Time to start beat and the workers before the schedules are due.
LEAD_SECONDS = 25


class Spy:
    """One plain subscriber: arrival time of every message, by topic."""

    def __init__(self, url: str, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.arrivals: dict[str, list[float]] = {}
        self.retained = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        u = urlparse(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"spy-{uuid.uuid4().hex[:6]}"
        )
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(u.hostname, u.port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("spy could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        now = time.time()
        with self._lock:
            self.arrivals.setdefault(msg.topic, []).append(now)
            self.retained += int(msg.retain)

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(len(v) for k, v in self.arrivals.items() if k.startswith(prefix))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def baseline(url: str, spy: Spy, count: int) -> dict:
    """A plain paho client publishing `count` QoS 1 messages at a planned instant."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    u = urlparse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"base-{uuid.uuid4().hex[:6]}")
    client.max_inflight_messages_set(500)
    client.connect(u.hostname, u.port)
    client.loop_start()
    planned = time.time() + 1.0
    time.sleep(planned - time.time())
    infos = [client.publish(f"home/base-{i}/cmd", b'{"action":"ON"}', qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    deadline = time.monotonic() + 30
    while spy.count("home/base-") < count and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    late = [t - planned for k, v in spy.arrivals.items() if k.startswith("home/base-") for t in v]
    return lateness_ms(late) | {"received": len(late)}


def lateness_ms(values: list[float]) -> dict:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 1),
        "p99_ms": round(percentile(values, 99) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1) if values else None,
    }


def create_fleet(prefix: str, planned: datetime) -> None:
    from apps.devices.models import Connection, Device, Profile
    from apps.owners.models import Owner
    from apps.schedules.models import Schedule

    owner = Owner.objects.create(name=f"bench {prefix}", slug=prefix, timezone="UTC")
    devices = Device.objects.bulk_create(
        Device(
            owner=owner,
            device_id=f"{prefix}-{i}",
            topic=f"{prefix}-{i}",
            profile=Profile.ESP32_LAMP,
            connection=Connection.ONLINE,
        )
        for i in range(DEVICES)
    )
    schedules = Schedule.objects.bulk_create(
        Schedule(
            owner=owner,
            name=f"s{i}",
            device=d,
            action="ON",
            timezone="UTC",
            cron=f"{planned.minute} {planned.hour} * * *",
            next_run_at=planned,
        )
        for i, d in enumerate(devices)
    )
    # The stored next run is what the platform itself computes for this expression.
    probe = schedules[0]
    assert probe.compute_next_run(planned - timedelta(seconds=1)) == planned


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "iotplatform", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def main() -> None:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    with mosquitto() as mqtt_url, postgres_database("bench_sched") as db_url:
        var = tempfile.mkdtemp(prefix="bench-schedules-")
        env = platform_env(
            db_url,
            MQTT_URL=mqtt_url,
            MQTT_PROTOCOL="5",
            VAR_DIR=var,
            CELERY_BROKER_URL=os.environ.get("BENCH_CELERY_BROKER_URL", "filesystem://"),
        )
        os.environ.update(env)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iotplatform.settings")
        import django

        django.setup()
        from django.db.models import Count, Max, Min

        from apps.devices.models import Command
        from apps.schedules.models import RunStatus, ScheduleRun

        now = datetime.now(UTC)
        planned = (now + timedelta(seconds=LEAD_SECONDS + 60)).replace(second=0, microsecond=0)
        create_fleet(prefix, planned)
        log(f"{DEVICES} schedules due at {planned:%H:%M:%S}Z; starting beat and {WORKERS} workers")

        spy = Spy(mqtt_url, ["home/+/cmd"])
        procs = [
            start(
                [
                    "worker",
                    "-l",
                    "warning",
                    "--pool",
                    "threads",
                    "--concurrency",
                    "2",
                    "-n",
                    f"bench{i}@%h",
                ],
                env,
            )
            for i in range(WORKERS)
        ]
        procs.append(start(["beat", "-l", "warning", "-s", str(Path(var) / "beat")], env))
        try:
            time.sleep(8)  # the baseline on a machine quiet again after the processes start
            base = baseline(mqtt_url, spy, DEVICES)
            log(f"baseline (raw paho, {DEVICES} QoS 1 at one instant): {base}")
            wait = planned.timestamp() - time.time()
            log(f"waiting {wait:.0f}s for the planned minute")
            time.sleep(max(0.0, wait))
            deadline = time.monotonic() + 60
            still = 0
            while time.monotonic() < deadline:
                got = spy.count(f"home/{prefix}-")
                if got >= DEVICES:
                    still += 1
                    if still > 6:  # a few quiet polls: late duplicates would show up
                        break
                time.sleep(0.5)
        finally:
            stop(procs)
            spy.close()
        for p in procs:
            # Celery's start-up chatter is noise here; errors and tracebacks are not.
            lines = (p.stderr.read() if p.stderr else "").splitlines()
            errors = [
                line for line in lines if any(w in line for w in ("ERROR", "Traceback", "Error:"))
            ]
            if errors:
                log(f"[celery {p.args[4]}] " + "\n".join(errors[-20:]))

        ours = {k: v for k, v in spy.arrivals.items() if k.startswith(f"home/{prefix}-")}
        first = [min(v) - planned.timestamp() for v in ours.values()]
        duplicates = sum(len(v) - 1 for v in ours.values())
        runs = dict(
            ScheduleRun.objects.filter(schedule__owner__slug=prefix)
            .values_list("status")
            .annotate(n=Count("id"))
        )
        ours_commands = Command.objects.filter(device__device_id__startswith=prefix)
        commands = ours_commands.count()
        stamps = ours_commands.aggregate(
            written=Max("issued_at"), first_sent=Min("published_at"), last_sent=Max("published_at")
        )

        def ms_after_planned(at: datetime | None) -> float | None:
            return round((at - planned).total_seconds() * 1000, 1) if at else None

        phases = {
            "commands_written_ms": ms_after_planned(stamps["written"]),
            "publish_started_ms": ms_after_planned(stamps["first_sent"]),
        }
        figures = {
            "bench": "schedules",
            "devices": DEVICES,
            "published": len(ours),
            "duplicates": duplicates,
            "missing": DEVICES - len(ours),
            "retained": spy.retained,
            "commands_logged": commands,
            "runs_published": runs.get(RunStatus.PUBLISHED, 0),
            "runs": runs,
            "lateness": lateness_ms(first),
            # Relative to the planned instant: claims and commands are written ahead (negative).
            "phases": phases,
            "baseline_lateness": base,
            "runner": f"celery beat + {WORKERS} workers",
            "database": "postgresql",
            "broker": "mosquitto",
        }
        log(
            f"published {len(ours)}/{DEVICES}, duplicates {duplicates}, lateness "
            f"p50 {figures['lateness']['p50_ms']} ms, p99 {figures['lateness']['p99_ms']} ms, "
            f"max {figures['lateness']['max_ms']} ms (baseline p99 {base['p99_ms']} ms)"
        )
        from django.db import connections

        connections.close_all()  # the database is dropped next
        shutil.rmtree(var, ignore_errors=True)
        emit(figures)
        if duplicates or len(ours) != DEVICES or spy.retained:
            sys.exit(1)  # a correctness failure, not a slow run: CI must not pass it


if __name__ == "__main__":
    main()
