"""What the admins of both destination kinds share (`apps/forwarding/destination_admin.py`):
enable/disable as a view and as list actions (with the backlog the re-enabled destination
sends or writes), Test Connection as a list action, and where a POST-only view sends the user
back to. Roles and other owners are in test_admin.py and test_database_admin.py. (Here, beside
the database fixtures, for both kinds.)"""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from apps.forwarding.models import Delivery, Destination, Status
from apps.forwarding.outbox import write_outbox

from ..conftest import make_event, make_webhook
from ..receiver import Answer
from .conftest import make_db_destination


def _message(response) -> str:
    """The newest message (they pile up in the session: the redirects are not followed)."""
    return [str(m) for m in get_messages(response.wsgi_request)][-1]


def _exercise(client, alice, destination: Destination, lamp, verb: str) -> None:
    client.force_login(alice)
    model = destination._meta.model_name
    enabled_url = reverse(f"admin:forwarding_{model}_enabled", args=[destination.pk])
    change_url = reverse(f"admin:forwarding_{model}_change", args=[destination.pk])
    changelist = reverse(f"admin:forwarding_{model}_changelist")
    write_outbox([make_event(lamp) for _ in range(2)])  # two deliveries waiting

    response = client.post(enabled_url, {"enabled": "0"})
    assert response.status_code == 302 and response["Location"] == change_url
    assert _message(response) == f"“{destination}” disabled; new events are not queued for it."
    destination.refresh_from_db()
    assert not destination.enabled

    # Back to where the user came from, if it is this site; never elsewhere.
    response = client.post(enabled_url, {"enabled": "1", "next": changelist})
    assert response["Location"] == changelist
    assert _message(response) == f"“{destination}” enabled; 2 waiting deliveries will be {verb}."
    pending = Delivery.objects.filter(destination=destination, status=Status.PENDING)
    assert sum(pending.values_list("events", flat=True)) == 2  # events (a database row packs them)
    response = client.post(enabled_url, {"enabled": "1", "next": "https://elsewhere.example/"})
    assert response["Location"] == change_url

    selected = {"_selected_action": [destination.pk], "index": "0"}
    response = client.post(changelist, {**selected, "action": "disable_selected"})
    assert response.status_code == 302 and _message(response) == "Disabled."
    destination.refresh_from_db()
    assert not destination.enabled
    response = client.post(changelist, {**selected, "action": "enable_selected"})
    assert _message(response) == "Enabled."
    destination.refresh_from_db()
    assert destination.enabled


@pytest.mark.django_db(transaction=True)
def test_a_webhook_is_disabled_enabled_and_tested_from_the_admin(
    client, alice, alice_owner, alice_lamp, receiver
) -> None:
    receiver.script("/hook", Answer(200))
    hook = make_webhook(alice_owner, receiver.url(), name="lake")
    _exercise(client, alice, hook, alice_lamp, "sent")

    changelist = reverse("admin:forwarding_webhookdestination_changelist")
    response = client.post(
        changelist, {"_selected_action": [hook.pk], "index": "0", "action": "test_selected"}
    )
    message = _message(response)
    assert message.startswith("“lake”: ") and message.endswith("(HTTP 200).")
    assert receiver.at("/hook"), "no signed ping was sent"


@pytest.mark.django_db(transaction=True)
def test_a_database_destination_is_disabled_enabled_and_tested_from_the_admin(
    client, alice, alice_owner, alice_lamp, postgres_db
) -> None:
    destination = make_db_destination(alice_owner, postgres_db, name="warehouse")
    _exercise(client, alice, destination, alice_lamp, "written")

    changelist = reverse("admin:forwarding_databasedestination_changelist")
    response = client.post(
        changelist, {"_selected_action": [destination.pk], "index": "0", "action": "test_selected"}
    )
    message = _message(response)
    # The readings table does not exist in this fresh database: the test says so by name.
    assert message.startswith("“warehouse”: ") and "readings" in message
    destination.refresh_from_db()
    assert destination.last_test_ok is False
