"""Diagnostics for operators: is every dependency reachable, and is every process doing its job?

    manage.py health [--json] [--strict] [--timeout 2]

Checks (FAIL makes the command exit 1):
  database, channel_layer, celery_broker   the round trips `/readyz` makes (apps.core.health)
  mqtt_broker                              an MQTT CONNECT with the listener's URL and login
  migrations                               every migration applied
Signs of a process that is not running (WARN; exit 1 with --strict):
  listener    devices are online but nothing was received for LISTENER_QUIET
  workers     a due delivery of an enabled destination has waited more than BEHIND
  beat        an enabled schedule has been due for more than BEHIND
  cache       web processes and the listener do not share a cache (CACHE_URL unset)

Secrets never appear in the output: URLs are shown without their passwords.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from apps.core import health

BEHIND = timedelta(seconds=60)
LISTENER_QUIET = timedelta(minutes=15)

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Finding:
    name: str
    level: str
    detail: str
    ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"level": self.level, "detail": self.detail}
        if self.ms is not None:
            result["ms"] = round(self.ms, 1)
        return result


def _safe_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()


def check_mqtt(timeout: float) -> None:
    """Connect with the listener's settings and wait for the broker's CONNACK."""
    import paho.mqtt.client as mqtt

    from apps.devices.mqtt import apply_login, mqtt_params, mqtt_protocol

    params = mqtt_params(settings.MQTT_URL)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"health-{os.getpid()}-{time.monotonic_ns() % 1_000_000}",
        protocol=mqtt_protocol(),
    )
    client.connect_timeout = timeout
    apply_login(client, params)
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        outcome["reason"] = reason
        answered.set()

    client.on_connect = on_connect
    client.connect(params["host"], params["port"], keepalive=10)
    client.loop_start()
    try:
        if not answered.wait(timeout):
            raise TimeoutError(f"no CONNACK within {timeout:g} s")
        reason = outcome["reason"]
        if reason.is_failure:
            raise RuntimeError(f"the broker refused the connection: {reason}")
    finally:
        client.disconnect()
        client.loop_stop()


def _timed(name: str, func: Callable[[], str | None]) -> Finding:
    started = time.perf_counter()
    try:
        detail = func() or ""
    except Exception as exc:
        return Finding(name, FAIL, f"{type(exc).__name__}: {exc}"[:300])
    return Finding(name, OK, detail, (time.perf_counter() - started) * 1000)


def pending_migrations() -> list[str]:
    """Unapplied migrations of every configured database (the embedded channel layer has its
    own), as `alias:app.migration`."""
    pending = []
    for alias in settings.DATABASES:
        executor = MigrationExecutor(connections[alias])
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        pending += [f"{alias}:{m.app_label}.{m.name}" for m, _backwards in plan]
    return pending


def process_findings() -> list[Finding]:
    """What the database says about the processes that write to it."""
    from apps.core.metrics import newest_telemetry_at
    from apps.devices.live import watch_is_shared
    from apps.devices.models import Connection, Device
    from apps.forwarding.metrics import oldest_due
    from apps.schedules.metrics import most_overdue

    now = timezone.now()
    found = []

    online = Device.objects.filter(connection=Connection.ONLINE).count()
    newest = newest_telemetry_at()
    if newest is None:
        level, detail = OK, "no message received yet"
    else:
        age = now - newest
        detail = f"last message {age.total_seconds():.0f} s ago; {online} device(s) online"
        level = WARN if online and age > LISTENER_QUIET else OK
        if level == WARN:
            detail += ": is `mqtt_listen` running?"
    found.append(Finding("listener", level, detail))

    oldest = min(oldest_due(now).values(), default=None)
    found.append(
        _waiting("workers", "oldest due delivery", oldest, now, "is a Celery worker running?")
    )
    found.append(
        _waiting(
            "beat", "most overdue schedule", most_overdue(now), now,
            "are beat and a worker running?",
        )
    )  # fmt: skip

    if watch_is_shared():
        found.append(Finding("cache", OK, "shared between processes"))
    else:
        found.append(
            Finding(
                "cache",
                WARN,
                "local to each process: set CACHE_URL (rate limits and live updates are then "
                "per process)",
            )
        )
    return found


def _waiting(name: str, what: str, since: Any, now: Any, hint: str) -> Finding:
    waited = (now - since) if since else timedelta(0)
    detail = f"{what} waited {waited.total_seconds():.0f} s"
    if waited > BEHIND:
        return Finding(name, WARN, f"{detail}: {hint}")
    return Finding(name, OK, detail)


class Command(BaseCommand):
    help = "Check the platform's dependencies and processes; exit 1 when one fails."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON object")
        parser.add_argument(
            "--strict", action="store_true", help="exit 1 on warnings too (processes not running)"
        )
        parser.add_argument(
            "--timeout", type=float, default=health.READINESS_TIMEOUT, help="seconds per check"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        timeout = options["timeout"]
        if timeout <= 0:
            raise CommandError("--timeout must be positive")
        what = {
            "database": f"{connections[DEFAULT_DB_ALIAS].vendor} "
            f"{connections[DEFAULT_DB_ALIAS].settings_dict['NAME']}",
            "channel_layer": settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1],
            "celery_broker": _safe_url(settings.CELERY_BROKER_URL),
        }
        findings = [
            Finding(r.name, OK if r.ok else FAIL, r.error or what.get(r.name, ""), r.ms)
            for r in asyncio.run(health.run_checks(timeout))
        ]
        findings.append(
            _timed("mqtt_broker", lambda: check_mqtt(timeout) or _safe_url(settings.MQTT_URL))
        )
        if all(f.level == OK for f in findings if f.name == "database"):
            pending = pending_migrations()
            findings.append(
                Finding(
                    "migrations",
                    FAIL if pending else OK,
                    f"not applied: {', '.join(pending[:5])}{' …' if len(pending) > 5 else ''} "
                    "(run `manage.py migrate`, with `--database ALIAS` for the others)"
                    if pending
                    else "all applied",
                )
            )
            if not pending:
                findings += process_findings()

        worst = FAIL if any(f.level == FAIL for f in findings) else (
            WARN if any(f.level == WARN for f in findings) else OK
        )  # fmt: skip
        if options["json"]:
            body = {"status": worst, "checks": {f.name: f.as_dict() for f in findings}}
            self.stdout.write(json.dumps(body, indent=2))
        else:
            for f in findings:
                ms = f" ({f.ms:.0f} ms)" if f.ms is not None else ""
                self.stdout.write(f"{f.level.upper():<5} {f.name:<14} {f.detail}{ms}".rstrip())
        if worst == FAIL or (worst == WARN and options["strict"]):
            raise SystemExit(1)
