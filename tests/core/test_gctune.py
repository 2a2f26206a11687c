"""The hot loops (listener, delivery workers) run with the collector tuned: apps.core.gctune."""

from __future__ import annotations

import gc
import signal

import pytest
from celery.signals import worker_process_init
from django.core.management import call_command

from apps.core import gctune


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_freezes_what_is_alive_and_raises_the_young_threshold(restore_gc):
    gc.unfreeze()
    survivor = {"alive": "at start"}
    gctune.tune()
    assert gc.get_threshold()[0] == gctune.YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0
    # Frozen objects are out of every generation: no collection visits them again.
    assert not any(obj is survivor for generation in range(3) for obj in gc.get_objects(generation))


def test_the_listener_runs_with_the_collector_tuned(restore_gc, monkeypatch):
    gc.set_threshold(700, 10, 10)
    seen = {}

    class FakeListener:
        def __init__(self, **kwargs):
            pass

        def run(self):
            seen["threshold"] = gc.get_threshold()[0]

        def stop(self):
            pass

    monkeypatch.setattr("apps.devices.management.commands.mqtt_listen.Listener", FakeListener)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        call_command("mqtt_listen", "--no-live")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen["threshold"] == gctune.YOUNG_THRESHOLD


def test_a_celery_worker_process_tunes_the_collector_when_it_starts(restore_gc):
    import iotplatform.celery  # noqa: F401 - connects the signal handlers

    gc.set_threshold(700, 10, 10)
    worker_process_init.send(sender=None)
    assert gc.get_threshold()[0] == gctune.YOUNG_THRESHOLD
