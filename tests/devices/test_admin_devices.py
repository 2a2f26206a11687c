"""The device admin: scoped lists, 404s, roles, form choices, filters and autocomplete."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.devices.models import Connection, Device, EventKind, Profile, Telemetry
from apps.owners.models import Membership, Owner, Role

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:devices_device_changelist")
ADD = reverse("admin:devices_device_add")


def change_url(device: Device) -> str:
    return reverse("admin:devices_device_change", args=[device.pk])


def device_form(device: Device, **changes) -> dict:
    data = {
        "name": device.name,
        "location": device.location,
        "topic": device.topic,
        "topic_order": device.topic_order,
        "relay_count": device.relay_count,
        "expected_interval": device.expected_interval,
        "offline_policy": device.offline_policy,
        **changes,
    }
    for prefix in ("transitions", "telemetry", "commands"):
        data.update({f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0"})
    return data


def new_device_form(owner: Owner | None, device_id: str) -> dict:
    data = {
        "device_id": device_id,
        "name": "New lamp",
        "profile": Profile.ESP32_LAMP,
        "topic": "",
        "topic_order": "prefix",
        "relay_count": "1",
        "expected_interval": "60",
        "offline_policy": "reject",
    }
    if owner is not None:
        data["owner"] = str(owner.pk)
    return data


# --- scoping --------------------------------------------------------------------------------------


def test_charlie_gets_a_404_for_alices_device_exactly_like_for_a_missing_one(
    client, charlie, alice_lamp
):
    client.force_login(charlie)
    foreign = client.get(change_url(alice_lamp))
    missing = client.get(reverse("admin:devices_device_change", args=[alice_lamp.pk + 1000]))
    assert foreign.status_code == missing.status_code == 404
    for name in ("devices_device_delete", "devices_device_history"):
        assert client.get(reverse(f"admin:{name}", args=[alice_lamp.pk])).status_code == 404


def test_charlie_cannot_change_or_delete_alices_device(client, charlie, alice_lamp):
    client.force_login(charlie)
    assert client.post(change_url(alice_lamp), device_form(alice_lamp, name="x")).status_code == 404
    delete = reverse("admin:devices_device_delete", args=[alice_lamp.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 404
    bulk = client.post(
        CHANGELIST,
        {"action": "delete_selected", "_selected_action": [alice_lamp.pk], "post": "yes"},
    )
    assert bulk.status_code in (200, 302)
    assert Device.objects.filter(pk=alice_lamp.pk).exists()
    alice_lamp.refresh_from_db()
    assert alice_lamp.name == "Living room"


def test_the_device_list_shows_only_the_users_devices(
    client, charlie, alice_lamp, alice_relay, charlie_lamp
):
    client.force_login(charlie)
    response = client.get(CHANGELIST)
    assert list(response.context["cl"].result_list) == [charlie_lamp]
    body = response.content.decode()
    assert "alice-lamp-1" not in body and "Alice Lamps" not in body


def test_a_search_for_alices_device_finds_nothing_for_charlie(client, charlie, alice_lamp):
    client.force_login(charlie)
    response = client.get(CHANGELIST, {"q": "alice-lamp-1"})
    assert list(response.context["cl"].result_list) == []


def test_superusers_see_every_device(client, admin_user, alice_lamp, charlie_lamp):
    client.force_login(admin_user)
    response = client.get(CHANGELIST)
    assert set(response.context["cl"].result_list) == {alice_lamp, charlie_lamp}
    assert client.get(change_url(alice_lamp)).status_code == 200


def test_filter_choices_name_no_other_owner(client, charlie, alice_owner, charlie_owner):
    second = Owner.objects.create(name="Charlie Second", slug="charlie-2")
    Membership.objects.create(owner=second, user=charlie, role=Role.VIEWER)
    client.force_login(charlie)
    body = client.get(CHANGELIST).content.decode()
    assert "Charlie Second" in body  # several owners: the owner filter is there...
    assert alice_owner.name not in body  # ...with charlie's owners only


def test_a_single_owner_user_gets_no_owner_column_or_filter(client, alice, alice_lamp):
    client.force_login(alice)
    response = client.get(CHANGELIST)
    assert "owner" not in response.context["cl"].list_display
    assert all(
        getattr(f, "field_path", None) != "owner" for f in response.context["cl"].filter_specs
    )


def test_autocomplete_returns_only_the_users_rows(client, charlie, alice_lamp, charlie_lamp):
    client.force_login(charlie)
    url = reverse("admin:autocomplete")
    devices = client.get(
        url, {"app_label": "devices", "model_name": "telemetry", "field_name": "device", "term": ""}
    ).json()
    assert [r["text"] for r in devices["results"]] == [str(charlie_lamp)]
    owners = client.get(
        url, {"app_label": "devices", "model_name": "device", "field_name": "owner", "term": "a"}
    ).json()
    assert [r["text"] for r in owners["results"]] == [str(charlie_lamp.owner)]


# --- roles ----------------------------------------------------------------------------------------


def test_a_viewer_sees_alices_device_but_cannot_change_it(client, bob, alice_lamp):
    client.force_login(bob)
    response = client.get(change_url(alice_lamp))
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert (
        client.post(change_url(alice_lamp), device_form(alice_lamp, name="Bob")).status_code == 403
    )
    assert client.get(ADD).status_code == 403
    alice_lamp.refresh_from_db()
    assert alice_lamp.name == "Living room"


def test_an_operator_may_operate_but_not_configure(rf, bob, alice_lamp):
    from django.contrib import admin

    Membership.objects.filter(user=bob).update(role=Role.OPERATOR)
    request = rf.get("/")
    request.user = bob
    device_admin = admin.site._registry[Device]
    assert device_admin.has_operate_permission(request, alice_lamp)
    assert not device_admin.has_change_permission(request, alice_lamp)


def test_the_owner_renames_her_device(client, alice, alice_lamp):
    client.force_login(alice)
    response = client.post(change_url(alice_lamp), device_form(alice_lamp, name="Hallway"))
    assert response.status_code == 302, response.context and response.context["errors"]
    alice_lamp.refresh_from_db()
    assert alice_lamp.name == "Hallway"


def test_owner_and_id_stay_fixed_after_creation(client, alice, alice_lamp, charlie_owner):
    client.force_login(alice)
    data = device_form(alice_lamp, owner=str(charlie_owner.pk), device_id="moved")
    assert client.post(change_url(alice_lamp), data).status_code == 302
    alice_lamp.refresh_from_db()
    assert alice_lamp.owner.slug == "alice"
    assert alice_lamp.device_id == "alice-lamp-1"


# --- adding ---------------------------------------------------------------------------------------


def test_a_single_owner_gets_the_owner_preselected_and_hidden(client, alice, alice_owner):
    client.force_login(alice)
    form = client.get(ADD).context["adminform"].form
    assert form.fields["owner"].widget.is_hidden
    assert form.fields["owner"].initial == alice_owner.pk
    assert list(form.fields["owner"].queryset) == [alice_owner]
    response = client.post(ADD, new_device_form(alice_owner, "alice-new-lamp"))
    assert response.status_code == 302
    created = Device.objects.get(device_id="alice-new-lamp")
    assert created.owner == alice_owner and created.topic == "alice-new-lamp"


def test_a_tampered_owner_id_is_refused(client, alice, charlie_owner):
    client.force_login(alice)
    response = client.post(ADD, new_device_form(charlie_owner, "sneaky-lamp"))
    assert response.status_code == 200
    assert "owner" in response.context["adminform"].form.errors
    assert not Device.objects.filter(device_id="sneaky-lamp").exists()


def test_a_viewer_in_one_owner_only_offers_the_owners_they_administer(
    client, alice, alice_owner, charlie_owner
):
    Membership.objects.create(owner=charlie_owner, user=alice, role=Role.VIEWER)
    client.force_login(alice)
    form = client.get(ADD).context["adminform"].form
    assert list(form.fields["owner"].queryset) == [alice_owner]


def test_a_superuser_chooses_among_all_owners(client, admin_user, alice_owner, charlie_owner):
    client.force_login(admin_user)
    form = client.get(ADD).context["adminform"].form
    assert not form.fields["owner"].widget.is_hidden
    assert set(form.fields["owner"].queryset) == {alice_owner, charlie_owner}


# --- the device page ------------------------------------------------------------------------------


def test_the_device_page_shows_state_history_and_the_live_link(client, alice, alice_lamp):
    now = timezone.now()
    alice_lamp.connection = Connection.ONLINE
    alice_lamp.power = {"1": "ON"}
    alice_lamp.last_seen_at = now - timedelta(minutes=3)
    alice_lamp.save()
    for i in range(25):
        Telemetry.objects.create(
            owner=alice_lamp.owner,
            device=alice_lamp,
            kind=EventKind.STATUS,
            topic="t",
            data={"power": "ON", "n": i},
            ts=now - timedelta(seconds=i),
            received_at=now,
        )
    client.force_login(alice)
    response = client.get(change_url(alice_lamp))
    body = response.content.decode()
    assert reverse("device-detail", args=[alice_lamp.device_id]) in body
    assert "3\xa0minutes ago" in body
    telemetry = next(
        f for f in response.context["inline_admin_formsets"] if f.formset.model is Telemetry
    )
    shown = [form.instance.data["n"] for form in telemetry.formset.forms]
    assert shown == list(range(20))  # the newest 20, newest first


def test_the_device_list_renders_status_columns(client, alice, alice_relay):
    alice_relay.power = {"1": "ON", "2": "OFF"}
    alice_relay.connection = Connection.OFFLINE
    alice_relay.save()
    client.force_login(alice)
    body = client.get(CHANGELIST).content.decode()
    assert "1 ON" in body and "2 OFF" in body
    assert "Offline" in body
    assert reverse("device-detail", args=[alice_relay.device_id]) in body


# --- deleting -------------------------------------------------------------------------------------


def test_the_owner_deletes_a_device_with_its_history(client, alice, alice_lamp):
    now = timezone.now()
    for _ in range(3):
        Telemetry.objects.create(
            owner=alice_lamp.owner,
            device=alice_lamp,
            kind=EventKind.STATUS,
            topic="t",
            data={},
            ts=now,
            received_at=now,
        )
    client.force_login(alice)
    url = reverse("admin:devices_device_delete", args=[alice_lamp.pk])
    confirm = client.get(url)
    assert confirm.context["perms_lacking"] == set()
    assert "telemetry: 3" in confirm.content.decode()  # counted, not listed row by row
    assert client.post(url, {"post": "yes"}).status_code == 302
    assert not Device.objects.filter(pk=alice_lamp.pk).exists()
    assert not Telemetry.objects.filter(device_id=alice_lamp.pk).exists()


def test_a_bulk_action_skips_rows_of_owners_the_user_only_views(
    client, charlie, alice_lamp, charlie_lamp, alice_owner
):
    # Charlie administers his owner and merely looks at alice's.
    Membership.objects.create(owner=alice_owner, user=charlie, role=Role.VIEWER)
    client.force_login(charlie)
    selected = [alice_lamp.pk, charlie_lamp.pk]
    assert set(client.get(CHANGELIST).context["cl"].result_list) == {alice_lamp, charlie_lamp}
    response = client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": selected, "post": "yes"}
    )
    assert response.status_code == 302
    assert Device.objects.filter(pk=alice_lamp.pk).exists()
    assert not Device.objects.filter(pk=charlie_lamp.pk).exists()


def test_the_delete_confirmation_refuses_a_row_the_user_may_not_delete(
    rf, charlie, alice_lamp, alice_owner
):
    from django.contrib import admin

    Membership.objects.create(owner=alice_owner, user=charlie, role=Role.VIEWER)
    request = rf.post("/")
    request.user = charlie
    device_admin = admin.site._registry[Device]
    _objects, _counts, perms_needed, _protected = device_admin.get_deleted_objects(
        [alice_lamp], request
    )
    assert perms_needed == {"device"}
