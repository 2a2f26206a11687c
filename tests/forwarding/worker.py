"""A real `celery worker -B` subprocess on this test's database and broker, for the tests that
stop or kill workers: Redis when TEST_REDIS_URL is set, else the embedded filesystem transport.
The embedded beat runs the production sweep (DatabaseScheduler)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from apps.forwarding.models import Delivery, Status

REPO = Path(__file__).resolve().parents[2]


def database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    if connection.vendor == "postgresql":
        user = db.get("USER") or "root"
        auth = f"{user}:{db['PASSWORD']}" if db.get("PASSWORD") else user
        host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
        return f"postgres://{auth}@{host}:{port}/{db['NAME']}"
    pytest.skip(f"no worker URL for {connection.vendor}")


class Worker:
    def __init__(
        self, queue: str, log: Path, drain_seconds: float = 10, pool: str = "prefork"
    ) -> None:
        self.queue = queue
        self.log = log
        self.drain_seconds = drain_seconds
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=database_url(),
            SECRET_KEY=settings.SECRET_KEY,
            FIELD_ENCRYPTION_KEYS=",".join(settings.FIELD_ENCRYPTION_KEYS),
            EGRESS_ALLOW="127.0.0.1/32",
            WEBHOOK_ALLOW_HTTP="1",
            DELIVERY_QUEUE=self.queue,
            DELIVERY_SWEEP_SECONDS="1",
            DELIVERY_LEASE_MARGIN="2",
            DELIVERY_DRAIN_SECONDS=str(self.drain_seconds),
            CELERY_BROKER_URL=os.environ.get("TEST_REDIS_URL") or "filesystem://",
        )
        return env

    def start(self) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", "iotplatform", "worker", "-B",
            "-Q", self.queue, "-P", self.pool, "-c", "2", "-l", "info", "-n", f"{self.queue}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-s", str(self.log.with_suffix(".beat")),
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: children die with it
            )  # fmt: skip

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, group: bool, timeout: float) -> int | None:
        """SIGTERM to the whole process group (systemd, honcho) or to the main process only
        (`docker stop`); the exit code, or None if it had not exited after `timeout` seconds."""
        assert self.proc is not None
        if group:
            os.killpg(self.proc.pid, signal.SIGTERM)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n--- worker log ---\n{tail}")
        time.sleep(0.2)


def wait_all_delivered(total: int, log: Path, timeout: float = 120) -> None:
    """After a worker's restart: until every one of the `total` events is delivered (a
    database destination's row carries several)."""

    wait_for(
        lambda: Delivery.objects.filter(status=Status.DELIVERED).events() == total,
        timeout,
        "every delivery after the restart",
        log,
    )
