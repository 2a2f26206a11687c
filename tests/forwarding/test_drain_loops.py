"""Drain loops in one process: one at a time (they share the process's event loop), and a
process being shut down stops its loops after what they have in flight.

The worker-level behaviour (signals, pools) is in test_worker_stop.py; these run the real loop
in the test process, against the loopback receiver.
"""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from apps.forwarding import pipeline
from apps.forwarding.models import Attempt, Delivery, Status
from apps.forwarding.outbox import write_outbox

from .conftest import make_event, make_webhook
from .receiver import Answer


def _in_thread(target, results: list) -> threading.Thread:
    def run() -> None:
        try:
            results.append(target())
        except BaseException as exc:  # the test reads it
            results.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_a_second_drain_in_a_process_leaves_the_work_to_the_running_one(
    receiver, alice_owner, alice_lamp
) -> None:
    # Celery's threads pool (make run) runs drain tasks side by side in one process; they shared
    # one event loop, and the second failed with "This event loop is already running".
    receiver.script("/hook", Answer(200, delay=0.05))
    make_webhook(alice_owner, receiver.url(), max_in_flight=2)
    write_outbox([make_event(alice_lamp) for _ in range(40)])

    first: list = []
    thread = _in_thread(lambda: pipeline.drain(30.0, linger=0.0), first)
    while not pipeline._running and thread.is_alive():
        threading.Event().wait(0.01)
    second = pipeline.drain(30.0, linger=0.0)
    thread.join(60)

    assert second == pipeline.DrainStats()  # returned at once, claimed nothing
    assert not isinstance(first[0], BaseException), first[0]
    assert first[0].delivered == 40
    assert Delivery.objects.filter(status=Status.DELIVERED).count() == 40
    # And the lock was let go: the next drain runs.
    write_outbox([make_event(alice_lamp)])
    assert pipeline.drain(10.0, linger=0.0).delivered == 1


@pytest.mark.django_db(transaction=True)
def test_shutting_down_stops_the_loops_after_their_deliveries_in_flight(
    receiver, alice_owner, alice_lamp, monkeypatch
) -> None:
    monkeypatch.setattr(pipeline, "_shutting_down", False)  # restored after the test
    receiver.script("/hook", Answer(200, delay=0.3))
    make_webhook(alice_owner, receiver.url(), max_in_flight=4)
    write_outbox([make_event(alice_lamp) for _ in range(200)])

    results: list = []
    thread = _in_thread(lambda: pipeline.drain(120.0, linger=0.0), results)
    while len(receiver.requests) < 8 and thread.is_alive():
        threading.Event().wait(0.01)
    assert pipeline.shut_down() == 1
    thread.join(20)
    assert not thread.is_alive(), "the loop did not stop"

    stats = results[0]
    assert not isinstance(stats, BaseException), stats
    assert stats.stopped and not stats.budget_spent
    delivered = Delivery.objects.filter(status=Status.DELIVERED).count()
    assert 8 <= delivered < 200
    # Everything that was sent was recorded; the rest waits, unclaimed, for the next worker.
    assert len(receiver.at("/hook")) == delivered
    assert not Delivery.objects.filter(status=Status.SENDING).exists()
    assert Delivery.objects.filter(status=Status.PENDING, attempts=0).count() == 200 - delivered
    assert not Attempt.objects.exclude(outcome="delivered").exists()
    # A loop started in a process that is shutting down ends at once.
    assert pipeline.drain(30.0, linger=0.0).delivered == 0
    assert Delivery.objects.filter(status=Status.DELIVERED).count() == delivered
