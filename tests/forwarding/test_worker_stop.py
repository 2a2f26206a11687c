"""Stop a real Celery worker in the middle of a burst: its drain loops finish what they have in
flight, record it and end, so the worker exits at once instead of after a drain's budget, no
row is left leased, and nothing is sent twice once the next worker takes over.

Both ways a worker is stopped: SIGTERM to its process group (systemd, honcho: the prefork
children get it too) and to its main process only (`docker stop`); and the threads pool that
`make run` uses.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.outbox import write_outbox

from .conftest import make_event, make_webhook
from .receiver import Answer
from .worker import Worker, wait_all_delivered, wait_for

EVENTS = 600
# Far longer than the test waits for the worker to exit: a stop that waited for the budget fails.
DRAIN_SECONDS = 120


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("pool", "group"),
    [("prefork", True), ("prefork", False), ("threads", False)],
    ids=["prefork-process-group", "prefork-main-process", "threads"],
)
def test_a_stopped_worker_finishes_its_deliveries_in_flight_and_exits(
    pool, group, receiver, alice_owner, alice_lamp, tmp_path, settings
) -> None:
    queue = f"fwd-stop-{uuid.uuid4().hex[:8]}"
    settings.DELIVERY_QUEUE = queue
    # Slow enough that the burst is still going when the worker is stopped, with requests in
    # flight at that moment.
    receiver.script("/hook", Answer(200, delay=0.2))
    make_webhook(alice_owner, receiver.url(), timeout=5, max_in_flight=4)
    for _ in range(EVENTS // 100):
        write_outbox([make_event(alice_lamp) for _ in range(100)])

    log = tmp_path / "worker.log"
    worker = Worker(queue, log, drain_seconds=DRAIN_SECONDS, pool=pool)
    try:
        worker.start()
        wait_for(lambda: len(receiver.requests) >= 20, 60, "the burst to start", log)
        exit_code = worker.terminate(group=group, timeout=30)
        output = log.read_text(errors="replace")
        assert exit_code == 0, f"the worker did not exit cleanly ({exit_code})\n{output[-3000:]}"
        assert "WorkerLostError" not in output, output[-3000:]

        delivered = Delivery.objects.filter(status=Status.DELIVERED).count()
        assert 0 < delivered < EVENTS, "the burst was not cut by the stop"
        # What was in flight was finished and recorded: nothing is left to a lease's expiry.
        assert not Delivery.objects.filter(status=Status.SENDING).exists()
        assert not Attempt.objects.filter(outcome=Outcome.INTERRUPTED).exists()
        assert len(receiver.at("/hook")) == delivered

        # The next worker takes over (its periodic sweep finds the due rows) and sends the rest.
        receiver.script("/hook", Answer(200))
        worker.start()
        wait_all_delivered(EVENTS, log)
    finally:
        worker.stop()

    received = Counter(r.headers["webhook-id"] for r in receiver.at("/hook"))
    assert set(received) == set(Delivery.objects.values_list("message_id", flat=True))
    assert max(received.values()) == 1, "a delivery was sent twice"
