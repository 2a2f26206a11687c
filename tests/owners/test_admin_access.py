"""Who gets into the admin: superusers and members, without is_staff or model permissions."""

from __future__ import annotations

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db

LOGIN = reverse("admin:login")
INDEX = reverse("admin:index")


def test_a_member_logs_in_without_is_staff(client, alice):
    assert not alice.is_staff
    response = client.post(
        f"{LOGIN}?next={INDEX}", {"username": "alice", "password": "alice-pass-123"}
    )
    assert response.status_code == 302
    assert response.url == INDEX
    assert client.get(INDEX).status_code == 200


def test_an_account_without_membership_is_refused_like_a_wrong_password(client, django_user_model):
    django_user_model.objects.create_user("drifter", "d@example.com", "drifter-pass-123")
    refused = client.post(LOGIN, {"username": "drifter", "password": "drifter-pass-123"})
    wrong = client.post(LOGIN, {"username": "drifter", "password": "not-the-password"})
    assert refused.status_code == wrong.status_code == 200
    assert refused.context["form"].errors == wrong.context["form"].errors
    assert "_auth_user_id" not in client.session


def test_an_inactive_member_is_refused(client, alice):
    alice.is_active = False
    alice.save()
    response = client.post(LOGIN, {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 200
    assert "_auth_user_id" not in client.session


def test_losing_the_last_membership_closes_the_admin_at_once(client, alice):
    client.force_login(alice)
    assert client.get(INDEX).status_code == 200
    alice.memberships.all().delete()
    response = client.get(INDEX)
    assert response.status_code == 302
    assert response.url.startswith(LOGIN)


def test_members_see_tenant_apps_and_not_the_operator_ones(client, alice):
    client.force_login(alice)
    response = client.get(INDEX)
    body = response.content.decode()
    assert reverse("admin:devices_device_changelist") in body
    assert reverse("admin:owners_owner_changelist") in body
    assert reverse("admin:accounts_user_changelist") not in body
    assert client.get(reverse("admin:accounts_user_changelist")).status_code == 403


def test_superusers_see_the_users_page(client, admin_user):
    client.force_login(admin_user)
    body = client.get(INDEX).content.decode()
    assert reverse("admin:accounts_user_changelist") in body
    assert client.get(reverse("admin:accounts_user_changelist")).status_code == 200


def test_a_member_given_user_permissions_by_mistake_still_cannot_edit_accounts(client, alice, bob):
    from django.contrib.auth.models import Permission

    alice.user_permissions.add(*Permission.objects.filter(content_type__app_label="accounts"))
    client.force_login(alice)
    response = client.get(reverse("admin:accounts_user_change", args=[bob.pk]))
    assert response.status_code == 403


def test_view_on_site_redirects_only_to_the_users_rows(
    client, monkeypatch, charlie, alice, alice_lamp
):
    # Django's admin/r/<ct>/<id>/ loads any row by id; ours goes through the scoped admin.
    from django.contrib.contenttypes.models import ContentType

    from apps.devices.models import Device

    monkeypatch.setattr(
        Device, "get_absolute_url", lambda self: f"/devices/{self.device_id}/", raising=False
    )
    url = reverse(
        "admin:view_on_site", args=[ContentType.objects.get_for_model(Device).pk, alice_lamp.pk]
    )
    client.force_login(charlie)
    assert client.get(url).status_code == 404
    client.force_login(alice)
    response = client.get(url)
    assert response.status_code == 302
    assert response.url.endswith("/devices/alice-lamp-1/")
