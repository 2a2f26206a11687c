"""The IoT Owners page: tabs, live counts, scoping, and the members tab."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.devices.models import (
    Connection,
    Device,
    EventKind,
    Profile,
    QuarantinedMessage,
    QuarantineReason,
    Telemetry,
)
from apps.owners.admin_tabs import OwnerTab, owner_tabs, register_owner_tab
from apps.owners.models import Membership, Owner, Role

pytestmark = pytest.mark.django_db


def change_url(owner: Owner) -> str:
    return reverse("admin:owners_owner_change", args=[owner.pk])


def members_post(owner: Owner, rows: list[dict], **owner_fields) -> dict:
    """The owner form as the browser posts it, with `rows` as the members formset."""
    data = {
        "name": owner.name,
        "timezone": owner.timezone,
        "memberships-TOTAL_FORMS": str(len(rows)),
        "memberships-INITIAL_FORMS": str(sum(1 for r in rows if r.get("id"))),
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        **owner_fields,
    }
    for i, row in enumerate(rows):
        for key, value in row.items():
            data[f"memberships-{i}-{key}"] = value
        data[f"memberships-{i}-owner"] = str(owner.pk)
    return data


def existing_rows(owner: Owner) -> list[dict]:
    return [
        {"id": str(m.pk), "role": m.role}
        for m in Membership.objects.filter(owner=owner).order_by("user__username")
    ]


# --- the page -------------------------------------------------------------------------------------


def test_every_tab_renders_for_a_member(client, alice, alice_lamp, alice_owner):
    client.force_login(alice)
    response = client.get(change_url(alice_owner))
    assert response.status_code == 200
    body = response.content.decode()
    for tab in owner_tabs():
        assert tab.title in body, tab.title
    assert 'id="general-group"' in body and 'id="devices-group"' in body
    assert 'id="memberships-group"' in body
    assert alice_lamp.device_id in body  # the Devices tab lists the owner's devices


def test_overview_counts_the_owners_devices_messages_quarantine_and_members(
    client, alice, bob, alice_owner, alice_lamp, alice_relay, charlie_lamp
):
    now = timezone.now()
    alice_lamp.connection = Connection.ONLINE
    alice_lamp.save()
    alice_relay.connection = Connection.OFFLINE
    alice_relay.save()
    Device.objects.create(owner=alice_owner, device_id="alice-new", profile=Profile.ESP32_LAMP)
    for minutes in (5, 30, 90):  # the last one is outside the hour
        Telemetry.objects.create(
            owner=alice_owner,
            device=alice_lamp,
            kind=EventKind.STATUS,
            topic="t",
            data={},
            ts=now - timedelta(minutes=minutes),
            received_at=now - timedelta(minutes=minutes),
        )
    Telemetry.objects.create(  # charlie's message never counts for alice
        owner=charlie_lamp.owner,
        device=charlie_lamp,
        kind=EventKind.STATUS,
        topic="t",
        data={},
        ts=now,
        received_at=now,
    )
    for hours, owner in ((1, alice_owner), (30, alice_owner), (1, None)):
        QuarantinedMessage.objects.create(
            owner=owner,
            received_at=now - timedelta(hours=hours),
            topic="home/x/status",
            reason=QuarantineReason.MALFORMED,
            payload=b"{",
            size=1,
        )

    client.force_login(alice)
    body = client.get(change_url(alice_owner)).content.decode()
    counts = {name: int(n) for name, n in re.findall(r'data-owner-stat="(\w+)"[^>]*>(\d+)<', body)}
    assert counts == {
        "online": 1,
        "offline": 1,
        "unknown": 1,
        "messages_1h": 2,
        "quarantined_24h": 1,
        "members": 2,
    }


def test_a_registered_tab_appears_in_order(client, alice, alice_owner):
    tab = register_owner_tab(
        OwnerTab(
            key="test-extra",
            title="Extra tab",
            order=25,
            template="admin/owners/owner/tab_panels.html",
        )
    )
    try:
        client.force_login(alice)
        body = client.get(change_url(alice_owner)).content.decode()
        assert body.index("Devices") < body.index("Extra tab") < body.index("Members")
        assert 'id="test-extra-group"' in body
    finally:
        from apps.owners import admin_tabs

        admin_tabs._tabs.pop(tab.key)


def test_a_tab_is_a_template_or_an_inline_never_both():
    with pytest.raises(ValueError):
        OwnerTab(key="x", title="X")


# --- scoping --------------------------------------------------------------------------------------


def test_charlie_gets_a_404_for_alices_owner_like_for_a_missing_one(client, charlie, alice_owner):
    client.force_login(charlie)
    assert client.get(change_url(alice_owner)).status_code == 404
    assert client.get(reverse("admin:owners_owner_change", args=[987654])).status_code == 404
    assert (
        client.get(reverse("admin:owners_owner_history", args=[alice_owner.pk])).status_code == 404
    )
    assert (
        client.get(reverse("admin:owners_owner_change", args=["not-a-number"])).status_code == 404
    )


def test_the_owner_list_shows_only_the_users_owners(client, charlie, alice_owner, charlie_owner):
    client.force_login(charlie)
    response = client.get(reverse("admin:owners_owner_changelist"))
    assert list(response.context["cl"].result_list) == [charlie_owner]
    assert alice_owner.name not in response.content.decode()


def test_superusers_see_every_owner(client, admin_user, alice_owner, charlie_owner):
    client.force_login(admin_user)
    response = client.get(reverse("admin:owners_owner_changelist"))
    assert set(response.context["cl"].result_list) == {alice_owner, charlie_owner}
    assert client.get(change_url(alice_owner)).status_code == 200


def test_charlie_cannot_post_to_alices_owner(client, charlie, alice_owner):
    client.force_login(charlie)
    response = client.post(change_url(alice_owner), members_post(alice_owner, [], name="Pwned"))
    assert response.status_code == 404
    alice_owner.refresh_from_db()
    assert alice_owner.name == "Alice Lamps"


# --- roles ----------------------------------------------------------------------------------------


def test_a_viewer_sees_the_page_read_only_and_cannot_save(client, alice, bob, alice_owner):
    client.force_login(bob)
    response = client.get(change_url(alice_owner))
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    post = client.post(
        change_url(alice_owner), members_post(alice_owner, existing_rows(alice_owner), name="Bob's")
    )
    assert post.status_code == 403
    alice_owner.refresh_from_db()
    assert alice_owner.name == "Alice Lamps"


def test_an_owner_renames_their_owner_but_not_its_slug(client, alice, alice_owner):
    client.force_login(alice)
    data = members_post(alice_owner, existing_rows(alice_owner), name="Alice Lights", slug="taken")
    response = client.post(change_url(alice_owner), data)
    assert response.status_code == 302, response.context and response.context["errors"]
    alice_owner.refresh_from_db()
    assert (alice_owner.name, alice_owner.slug) == ("Alice Lights", "alice")


def test_only_superusers_add_or_delete_owners(client, alice, alice_owner, admin_user):
    client.force_login(alice)
    assert client.get(reverse("admin:owners_owner_add")).status_code == 403
    assert (
        client.get(reverse("admin:owners_owner_delete", args=[alice_owner.pk])).status_code == 403
    )
    client.force_login(admin_user)
    assert client.get(reverse("admin:owners_owner_add")).status_code == 200


# --- members tab ----------------------------------------------------------------------------------


def test_an_owner_adds_a_member_by_email(client, alice, alice_owner, charlie):
    client.force_login(alice)
    rows = [*existing_rows(alice_owner), {"member": "CHARLIE@example.com", "role": Role.OPERATOR}]
    response = client.post(change_url(alice_owner), members_post(alice_owner, rows))
    assert response.status_code == 302
    assert Membership.objects.get(owner=alice_owner, user=charlie).role == Role.OPERATOR


def test_an_owner_adds_a_member_by_username(client, alice, alice_owner, charlie):
    client.force_login(alice)
    rows = [*existing_rows(alice_owner), {"member": "charlie", "role": Role.VIEWER}]
    assert client.post(change_url(alice_owner), members_post(alice_owner, rows)).status_code == 302
    assert Membership.objects.filter(owner=alice_owner, user=charlie).exists()


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("nobody@example.com", "No active account"),
        ("bob", "already a member"),
    ],
)
def test_adding_an_unknown_or_existing_member_is_refused(
    client, alice, bob, alice_owner, member, message
):
    client.force_login(alice)
    rows = [*existing_rows(alice_owner), {"member": member, "role": Role.VIEWER}]
    response = client.post(change_url(alice_owner), members_post(alice_owner, rows))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert Membership.objects.filter(owner=alice_owner).count() == 2


def test_an_admin_cannot_grant_the_owner_role(client, alice, bob, alice_owner):
    Membership.objects.filter(user=bob).update(role=Role.ADMIN)
    client.force_login(bob)
    rows = existing_rows(alice_owner)
    for row in rows:
        if row["role"] == Role.ADMIN:
            row["role"] = Role.OWNER
    response = client.post(change_url(alice_owner), members_post(alice_owner, rows))
    assert response.status_code == 200
    assert "Only a member with the owner role" in response.content.decode()
    assert Membership.objects.get(user=bob).role == Role.ADMIN


def test_an_admin_cannot_remove_an_owner(client, alice, bob, alice_owner):
    Membership.objects.filter(user=bob).update(role=Role.ADMIN)
    client.force_login(bob)
    rows = existing_rows(alice_owner)
    for row in rows:
        if row["role"] == Role.OWNER:
            row["DELETE"] = "on"
    response = client.post(change_url(alice_owner), members_post(alice_owner, rows))
    assert response.status_code == 200
    assert Membership.objects.filter(user=alice, owner=alice_owner).exists()


def test_the_last_owner_cannot_step_down(client, alice, alice_owner):
    client.force_login(alice)
    rows = existing_rows(alice_owner)
    rows[0]["role"] = Role.ADMIN
    response = client.post(change_url(alice_owner), members_post(alice_owner, rows))
    assert response.status_code == 200
    assert "at least one member with the owner role" in response.content.decode()


def test_the_members_tab_does_not_list_accounts_of_other_owners(
    client, alice, charlie, alice_owner
):
    client.force_login(alice)
    body = client.get(change_url(alice_owner)).content.decode()
    assert "charlie" not in body.lower()
