"""Dead letters are kept and can be replayed — one, a selection, a time range — with the same
webhook-id and a fresh attempt, from the actions and from `manage.py replay_deliveries`."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.forwarding import actions
from apps.forwarding.models import Attempt, Delivery, Status
from apps.forwarding.outbox import write_outbox

from .conftest import deliver_due, make_event, make_webhook
from .receiver import Answer, signed_by


@pytest.fixture
def dead_letters(receiver, alice_owner, alice_lamp):
    receiver.script("/hook", Answer(400))
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp) for _ in range(5)])
    deliver_due()
    assert Delivery.objects.filter(status=Status.FAILED).count() == 5
    receiver.script("/hook", Answer(200))
    receiver.requests.clear()
    return hook


def test_replaying_one_keeps_its_webhook_id(dead_letters, receiver) -> None:
    one = Delivery.objects.order_by("id").first()
    assert actions.replay_deliveries(Delivery.objects.filter(pk=one.pk)) == 1
    deliver_due()
    one.refresh_from_db()
    assert one.status == Status.DELIVERED and one.replays == 1
    [request] = receiver.requests
    assert request.headers["webhook-id"] == one.message_id
    assert signed_by(request, dead_letters.secret.reveal())
    # The log keeps the failed attempt and adds the new one.
    assert [a.outcome for a in Attempt.objects.filter(delivery=one).order_by("id")] == [
        "failed",
        "delivered",
    ]


def test_a_selection_skips_rows_already_on_their_way(dead_letters, receiver) -> None:
    first, second, *_ = Delivery.objects.order_by("id")
    Delivery.objects.filter(pk=second.pk).update(status=Status.PENDING)
    count = actions.replay_deliveries(Delivery.objects.filter(pk__in=[first.pk, second.pk]))
    assert count == 1


def test_a_time_range_replays_only_dead_letters_in_it(dead_letters, receiver) -> None:
    rows = list(Delivery.objects.order_by("id"))
    base = timezone.now() - timedelta(hours=5)
    for i, row in enumerate(rows):
        Delivery.objects.filter(pk=row.pk).update(created_at=base + timedelta(hours=i))
    count = actions.replay_range(
        Delivery.objects.all(), since=base + timedelta(hours=1), until=base + timedelta(hours=3)
    )
    assert count == 2
    deliver_due()
    assert {r.headers["webhook-id"] for r in receiver.requests} == {
        rows[1].message_id,
        rows[2].message_id,
    }


def test_the_command_replays_a_range_of_one_owner(dead_letters, receiver, charlie_owner) -> None:
    out = StringIO()
    since = (timezone.now() - timedelta(hours=1)).isoformat()
    call_command("replay_deliveries", "--owner", "alice", "--since", since, stdout=out)
    assert "replaying 5 deliveries of alice" in out.getvalue()
    deliver_due()
    assert len(receiver.requests) == 5


def test_the_command_never_reaches_another_owner(dead_letters, charlie) -> None:
    ids = list(Delivery.objects.values_list("id", flat=True))
    out = StringIO()
    call_command("replay_deliveries", "--owner", "charlie", *[f"--id={i}" for i in ids], stdout=out)
    assert "replaying 0 deliveries" in out.getvalue()
    assert Delivery.objects.filter(status=Status.FAILED).count() == 5


def test_the_command_wants_a_selection(dead_letters) -> None:
    with pytest.raises(CommandError, match="say what to replay"):
        call_command("replay_deliveries", "--owner", "alice")
    with pytest.raises(CommandError, match="no owner"):
        call_command("replay_deliveries", "--owner", "nobody", "--id", "1")
