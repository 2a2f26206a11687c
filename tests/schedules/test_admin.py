"""Schedules in the admin: the form and its preview, enable/disable, the owner's Schedules tab,
the device page card, the device switch actions — and what bob (viewer) and charlie cannot do."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.template import Context, Template
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from apps.devices.models import Command, Connection, Device, Profile
from apps.schedules import actions
from apps.schedules.models import RunStatus, Schedule, ScheduleRun
from tests.schedules import spy as spying
from tests.schedules.spy import unique

pytestmark = pytest.mark.django_db

command_broker = spying.command_broker
spy = spying.spy

PREVIEW = reverse("admin:schedules_schedule_preview")
ADD = reverse("admin:schedules_schedule_add")


@pytest.fixture
def evening(alice_lamp) -> Schedule:
    return actions.save_schedule(
        Schedule(
            owner=alice_lamp.owner,
            name="evening",
            device=alice_lamp,
            action="ON",
            cron="30 18 * * *",
            timezone="Europe/Berlin",
        )
    )


def form_data(owner, device, **overrides):
    data = {
        "owner": owner.pk,
        "name": "morning",
        "device": device.pk,
        "group": "",
        "action": "OFF",
        "relay": "",
        "cron": "0 7 * * 1-5",
        "timezone": "Europe/Berlin",
        "enabled": "on",
        "starts_on": "",
        "ends_on": "",
        # the recent-runs inline's management form (empty on a new schedule)
        "runs-TOTAL_FORMS": "0",
        "runs-INITIAL_FORMS": "0",
    }
    data.update(overrides)
    return data


def test_preview_lists_ten_runs_local_and_utc_and_marks_dst(client, alice):
    client.force_login(alice)
    response = client.get(PREVIEW, {"cron": "30 2 * * *", "timezone": "Europe/Berlin"})
    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-preview-rows="10"' in html
    assert "UTC" in html and "Europe/Berlin" in html


def test_preview_shows_local_times_in_the_schedules_zone_beside_utc(client, alice):
    client.force_login(alice)
    html = client.get(PREVIEW, {"cron": "30 18 * * *", "timezone": "America/New_York"}).content
    # Local 18:30 in New York (EST or EDT, whatever today is), UTC 23:30 or 22:30.
    assert re.search(r"18:30 E[SD]T</td>\s*<td[^>]*>\d{4}-\d\d-\d\d (23|22):30<", html.decode())


def test_preview_shows_the_errors_of_what_is_typed(client, alice):
    client.force_login(alice)
    html = client.get(PREVIEW, {"cron": "0 30 2 * * *", "timezone": "Mars/Base"}).content.decode()
    assert "exactly 5 fields" in html and "not an IANA time zone" in html
    assert "data-preview-rows" not in html


def test_preview_marks_the_runs_next_to_a_clock_change(alice, rf):
    from apps.schedules.views import preview_rows

    rows, errors, _ = preview_rows("30 2 * * *", "Europe/Berlin")
    assert not errors and len(rows) == 10
    # Whatever today is, the rows marked are exactly those within a day of a transition.
    for row in rows:
        before = (row.at - timedelta(days=1)).astimezone(row.local.tzinfo).utcoffset()
        after = (row.at + timedelta(days=1)).astimezone(row.local.tzinfo).utcoffset()
        assert row.near_dst == (before != after or "does not exist" in row.note)


def test_the_add_form_shows_the_preview_box(client, alice):
    client.force_login(alice)
    html = client.get(ADD).content.decode()
    assert 'id="schedule-preview"' in html and "schedules/preview.js" in html
    assert '<datalist id="iana-zones">' in html


def test_saving_through_the_admin_validates_and_computes_next_run(client, alice, alice_lamp):
    client.force_login(alice)
    bad = client.post(ADD, form_data(alice_lamp.owner, alice_lamp, cron="0 7 * * * *"))
    assert bad.status_code == 200 and "exactly 5 fields" in bad.content.decode()
    bad = client.post(ADD, form_data(alice_lamp.owner, alice_lamp, timezone="Berlin"))
    assert "not an IANA time zone" in bad.content.decode()
    assert not Schedule.objects.exists()

    ok = client.post(ADD, form_data(alice_lamp.owner, alice_lamp))
    assert ok.status_code == 302, ok.content.decode()[:2000]
    saved = Schedule.objects.get()
    assert saved.next_run_at > timezone.now()
    local = saved.next_run_at.astimezone(saved.zone())
    assert (local.hour, local.minute) == (7, 0) and local.isoweekday() <= 5


def test_bob_the_viewer_sees_schedules_but_cannot_add_or_toggle(client, bob, evening):
    client.force_login(bob)
    assert (
        client.get(reverse("admin:schedules_schedule_change", args=[evening.pk])).status_code == 200
    )
    assert client.get(ADD).status_code == 403
    url = reverse("admin:schedules_schedule_enabled", args=[evening.pk])
    client.post(url, {"enabled": "0"})
    assert Schedule.objects.get(pk=evening.pk).enabled


def test_alice_toggles_a_schedule_and_returns_to_where_she_was(client, alice, evening):
    client.force_login(alice)
    url = reverse("admin:schedules_schedule_enabled", args=[evening.pk])
    back = reverse("admin:owners_owner_change", args=[evening.owner_id]) + "#schedules"
    response = client.post(url, {"enabled": "0", "next": back})
    assert response.status_code == 302 and response["Location"] == back
    evening.refresh_from_db()
    assert not evening.enabled and evening.next_run_at is None
    response = client.post(url, {"enabled": "1", "next": "https://evil.example/"})
    assert response["Location"] == reverse("admin:schedules_schedule_change", args=[evening.pk])
    assert Schedule.objects.get(pk=evening.pk).enabled


def test_charlie_can_neither_see_nor_toggle_alices_schedules(client, charlie, evening):
    client.force_login(charlie)
    change = reverse("admin:schedules_schedule_change", args=[evening.pk])
    assert client.get(change).status_code == 404
    listing = client.get(reverse("admin:schedules_schedule_changelist")).content.decode()
    assert "evening" not in listing
    toggle = reverse("admin:schedules_schedule_enabled", args=[evening.pk])
    assert client.post(toggle, {"enabled": "0"}).status_code == 404
    assert Schedule.objects.get(pk=evening.pk).enabled
    runs = client.get(reverse("admin:schedules_schedulerun_changelist")).content.decode()
    assert "evening" not in runs
    owner_page = reverse("admin:owners_owner_change", args=[evening.owner_id])
    assert client.get(owner_page).status_code == 404


def test_charlie_cannot_target_alices_lamp_from_his_own_form(
    client, charlie, charlie_owner, alice_lamp
):
    client.force_login(charlie)
    response = client.post(ADD, form_data(charlie_owner, alice_lamp))
    assert response.status_code == 200  # the form comes back: not a valid choice
    assert not Schedule.objects.exists()


def test_the_owner_page_has_a_schedules_tab_with_next_runs_and_run_history(
    client, alice, evening, alice_lamp
):
    ScheduleRun.objects.create(
        owner=evening.owner,
        schedule=evening,
        device=alice_lamp,
        claim="t",
        planned_at=timezone.now() - timedelta(minutes=5),
        status=RunStatus.MISSED,
        detail="missed: more than 300s late",
    )
    client.force_login(alice)
    html = client.get(
        reverse("admin:owners_owner_change", args=[evening.owner_id])
    ).content.decode()
    assert 'id="schedules-group"' in html
    assert "evening" in html and "30 18 * * *" in html
    assert re.search(r"18:30 CES?T", html)  # next runs in the schedule's zone
    assert "missed: more than 300s late" in html
    assert reverse("admin:schedules_schedule_enabled", args=[evening.pk]) in html


def test_the_device_page_card_lists_the_devices_schedules(alice, bob, evening, alice_lamp):
    request = RequestFactory().get("/devices/x/")
    template = Template('{% include "schedules/_device_schedules.html" %}')
    for user, can_toggle in ((alice, True), (bob, False)):
        request.user = user
        html = template.render(Context({"device": alice_lamp, "request": request}))
        assert "evening" in html and "30 18 * * *" in html
        assert re.search(r"18:30 CES?T", html)
        toggle = reverse("admin:schedules_schedule_enabled", args=[evening.pk])
        assert (toggle in html) is can_toggle


# --- switching a selection of devices from the device list ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_switch_on_action_publishes_to_every_relay_of_the_selection(
    client, alice, alice_owner, spy
):
    lamp = Device.objects.create(
        owner=alice_owner,
        device_id=unique("adm-lamp"),
        profile=Profile.ESP32_LAMP,
        connection=Connection.ONLINE,
    )
    relay = Device.objects.create(
        owner=alice_owner,
        device_id=unique("adm-relay"),
        topic=unique("adm-tas"),
        profile=Profile.TASMOTA,
        relay_count=2,
        connection=Connection.ONLINE,
    )
    client.force_login(alice)
    response = client.post(
        reverse("admin:devices_device_changelist"),
        {"action": "switch_on", "_selected_action": [lamp.pk, relay.pk]},
        follow=True,
    )
    sent = [str(m) for m in response.context["messages"]]
    assert "ON: 3 published." in sent, sent
    assert len(spy.wait_for(f"home/{lamp.device_id}/cmd")) == 1
    assert len(spy.wait_for(f"cmnd/{relay.topic}/POWER", count=2)) == 2
    assert Command.objects.filter(issuer_label="alice").count() == 3


def test_bob_the_viewer_cannot_switch_from_the_device_list(client, bob, alice_lamp):
    client.force_login(bob)
    client.post(
        reverse("admin:devices_device_changelist"),
        {"action": "switch_off", "_selected_action": [alice_lamp.pk]},
    )
    assert not Command.objects.exists()


def test_charlie_cannot_switch_alices_lamp_from_the_device_list(client, charlie, alice_lamp):
    client.force_login(charlie)
    client.post(
        reverse("admin:devices_device_changelist"),
        {"action": "switch_off", "_selected_action": [alice_lamp.pk]},
    )
    assert not Command.objects.exists()


def test_the_template_tag_needs_no_request_for_plain_rendering(alice_lamp, evening):
    html = Template("{% load schedules %}{% device_schedules device %}").render(
        Context({"device": alice_lamp})
    )
    assert "evening" in html and "Disable" not in html


def test_the_add_form_starts_in_the_owners_time_zone(client, alice, alice_owner, alice_lamp):
    client.force_login(alice)
    for query in (f"?owner={alice_owner.pk}", "?owner=nonsense", ""):
        html = client.get(ADD + query).content.decode()
        assert 'value="Europe/Berlin"' in html


def test_beat_has_the_runner_and_the_command_sweep():
    from django_celery_beat.models import PeriodicTask

    from iotplatform.celery import app

    tasks = dict(PeriodicTask.objects.values_list("task", "interval__every"))
    assert tasks["schedules.run_due"] == 2 and tasks["commands.sweep"] == 5
    app.loader.import_default_modules()
    assert {"schedules.run_due", "commands.sweep", "commands.send_held"} <= set(app.tasks)
