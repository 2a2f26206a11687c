"""SIGKILL a real Celery worker in the middle of a burst, start it again: every event ends up
delivered — exactly once, or more than once under the same webhook-id — and none is lost.

The worker is a real `celery worker -B` subprocess (embedded beat with the DatabaseScheduler,
so the periodic sweep is the production one) on this test's database and broker: Redis when
TEST_REDIS_URL is set, else the embedded filesystem transport.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.outbox import write_outbox

from .conftest import make_event, make_webhook
from .receiver import Answer, signed_by

REPO = Path(__file__).resolve().parents[2]
EVENTS = 1500


def _database_url() -> str:
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
    def __init__(self, queue: str, log: Path) -> None:
        self.queue = queue
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=_database_url(),
            SECRET_KEY=settings.SECRET_KEY,
            FIELD_ENCRYPTION_KEYS=",".join(settings.FIELD_ENCRYPTION_KEYS),
            EGRESS_ALLOW="127.0.0.1/32",
            WEBHOOK_ALLOW_HTTP="1",
            DELIVERY_QUEUE=self.queue,
            DELIVERY_SWEEP_SECONDS="1",
            DELIVERY_LEASE_MARGIN="2",
            DELIVERY_DRAIN_SECONDS="10",
            CELERY_BROKER_URL=os.environ.get("TEST_REDIS_URL") or "filesystem://",
        )
        return env

    def start(self) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", "iotplatform", "worker", "-B",
            "-Q", self.queue, "-c", "2", "-l", "info", "-n", f"{self.queue}@%h",
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

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n--- worker log ---\n{tail}")
        time.sleep(0.2)


@pytest.mark.django_db(transaction=True)
def test_killing_a_worker_mid_burst_loses_nothing(
    receiver, alice_owner, alice_lamp, tmp_path, settings
) -> None:
    queue = f"fwd-crash-{uuid.uuid4().hex[:8]}"
    settings.DELIVERY_QUEUE = queue
    # A receiver slow enough that the burst is still going when the worker dies.
    receiver.script("/hook", Answer(200, delay=0.02))
    hook = make_webhook(alice_owner, receiver.url(), timeout=2, max_in_flight=8)
    for _ in range(EVENTS // 100):
        write_outbox([make_event(alice_lamp) for _ in range(100)])

    log = tmp_path / "worker.log"
    worker = Worker(queue, log)
    try:
        worker.start()
        _wait(lambda: len(receiver.requests) >= 300, 60, "the burst to start", log)
        worker.kill()
        in_flight = Delivery.objects.filter(status=Status.SENDING).count()
        delivered_before = Delivery.objects.filter(status=Status.DELIVERED).count()
        assert delivered_before < EVENTS, "the burst ended before the kill"

        worker.start()
        _wait(
            lambda: Delivery.objects.filter(status=Status.DELIVERED).count() == EVENTS,
            120,
            "every delivery after the restart",
            log,
        )
    finally:
        worker.stop()

    expected = dict(Delivery.objects.values_list("message_id", "event_id"))
    received = Counter(r.headers["webhook-id"] for r in receiver.at("/hook"))
    assert set(received) == set(expected)  # nothing lost, nothing foreign
    duplicates = {msg_id: n for msg_id, n in received.items() if n > 1}
    # Anything received twice was in flight at the kill (or its result was not yet recorded).
    assert len(duplicates) <= in_flight + 16, duplicates
    assert all(signed_by(r, hook.secret.reveal()) for r in receiver.at("/hook"))
    if in_flight:
        # The dead worker's leases expired and the sweep logged the lost attempts.
        assert Attempt.objects.filter(outcome=Outcome.INTERRUPTED).count() >= in_flight
