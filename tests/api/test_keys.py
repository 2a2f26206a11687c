"""API keys: the token format, hashed storage, bearer auth, revocation, and the admin tab."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.api import keys
from apps.api.actions import create_api_key, revoke_api_key
from apps.api.models import ApiKey
from apps.owners.models import Membership, Role

from .conftest import ApiClient

pytestmark = pytest.mark.django_db

CAPABILITIES = "/api/v1/capabilities/"


def test_tokens_have_the_prefix_the_random_part_and_a_checksum():
    token = keys.generate()
    prefix, body, crc = token.split("_")
    assert prefix == "iotp" and len(body) == 43 and len(crc) == 6
    assert keys.well_formed(token)
    assert keys.generate() != token


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # checksum off by one character
        lambda t: t[:20] + ("x" if t[20] != "x" else "y") + t[21:],  # a typo in the body
        lambda t: t[:-3],  # truncated
        lambda t: t.replace("iotp_", "ghp_"),
        lambda t: t + "x",  # one character too many
        lambda t: "",
    ],
)
def test_malformed_tokens_are_refused_without_a_database_query(
    mangle, alice_key, django_assert_num_queries
):
    token = mangle(alice_key[1])
    assert not keys.well_formed(token)
    with django_assert_num_queries(0):
        response = ApiClient(token).get(CAPABILITIES)
    assert response.status_code == 401


def test_only_a_digest_of_the_token_is_stored(alice_key):
    key, token = alice_key
    row = ApiKey.objects.filter(pk=key.pk).values().get()
    assert token not in repr(row)
    assert row["digest"] == keys.digest(token)
    assert row["prefix"] == token[:13]


def test_a_valid_key_authenticates_and_names_its_owner(alice_api, alice_key):
    response = alice_api.get(CAPABILITIES)
    assert response.status_code == 200
    body = response.json()
    assert body["owner"]["slug"] == "alice"
    assert body["key"]["prefix"] == alice_key[0].prefix


def test_capabilities_tell_how_far_back_history_goes(alice_api, settings):
    settings.TELEMETRY_RETENTION_DAYS = 90
    settings.HISTORY_RETENTION_DAYS = 0
    body = alice_api.get(CAPABILITIES).json()
    assert body["retention"] == {"telemetry_days": 90, "history_days": None}


def test_no_credentials_is_401_with_a_bearer_challenge():
    response = ApiClient(None).get("/api/v1/devices/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "not_authenticated"


def test_an_unknown_well_formed_key_is_401():
    response = ApiClient(keys.generate()).get(CAPABILITIES)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_other_schemes_are_refused(alice_key):
    response = ApiClient(None).client.get(CAPABILITIES, HTTP_AUTHORIZATION=f"Token {alice_key[1]}")
    assert response.status_code == 401


def test_revocation_takes_effect_on_the_next_request(alice_api, alice_key):
    assert alice_api.get(CAPABILITIES).status_code == 200
    revoke_api_key(alice_key[0])
    response = alice_api.get(CAPABILITIES)
    assert response.status_code == 401


def test_last_used_is_written_at_most_once_a_minute(
    alice_api, alice_key, django_assert_num_queries
):
    alice_api.get(CAPABILITIES)
    first = ApiKey.objects.get(pk=alice_key[0].pk).last_used_at
    assert first is not None
    alice_api.get(CAPABILITIES)
    assert ApiKey.objects.get(pk=alice_key[0].pk).last_used_at == first
    ApiKey.objects.filter(pk=alice_key[0].pk).update(last_used_at=first - timedelta(minutes=2))
    alice_api.get(CAPABILITIES)
    assert ApiKey.objects.get(pk=alice_key[0].pk).last_used_at > first - timedelta(seconds=1)


def test_a_key_outlives_the_member_who_made_it(alice_api, alice):
    Membership.objects.filter(user=alice).delete()
    assert alice_api.get(CAPABILITIES).status_code == 200


# --- the admin tab ------------------------------------------------------------------------------


def owner_page(owner) -> str:
    return reverse("admin:owners_owner_change", args=[owner.pk])


def test_the_owner_page_has_an_api_keys_tab_listing_keys_without_tokens(
    client, alice, alice_owner, alice_key
):
    client.force_login(alice)
    body = client.get(owner_page(alice_owner)).content.decode()
    assert "API keys" in body
    assert alice_key[0].prefix in body
    assert alice_key[1] not in body


def test_creating_a_key_in_the_admin_shows_the_token_once(client, alice, alice_owner):
    client.force_login(alice)
    response = client.post(
        reverse("admin:api_apikey_add") + f"?owner={alice_owner.pk}",
        {
            "owner": alice_owner.pk,
            "name": "billing sync",
            "scopes": ["devices:read", "telemetry:read"],
        },
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get(name="billing sync")
    token = response.context["token"]
    assert token in response.content.decode()
    assert keys.digest(token) == key.digest
    assert key.scopes == ["devices:read", "telemetry:read"]
    assert key.created_by == alice
    # Shown once: neither the change page nor the owner page shows it again.
    assert (
        token not in client.get(reverse("admin:api_apikey_change", args=[key.pk])).content.decode()
    )
    assert token not in client.get(owner_page(alice_owner)).content.decode()
    assert ApiClient(token).get(CAPABILITIES).json()["scopes"] == ["devices:read", "telemetry:read"]


def test_revoking_in_the_admin_stops_the_key(client, alice, alice_owner, alice_key, alice_api):
    client.force_login(alice)
    response = client.post(
        reverse("admin:api_apikey_revoke", args=[alice_key[0].pk]),
        {"next": owner_page(alice_owner) + "#api-keys"},
    )
    assert response.status_code == 302
    assert ApiKey.objects.get(pk=alice_key[0].pk).revoked_at is not None
    assert alice_api.get(CAPABILITIES).status_code == 401


def test_viewers_and_operators_do_not_see_or_manage_keys(
    client, bob, alice_owner, alice_key, django_user_model
):
    client.force_login(bob)  # a viewer
    body = client.get(owner_page(alice_owner)).content.decode()
    assert alice_key[0].prefix not in body
    assert client.get(reverse("admin:api_apikey_changelist")).status_code == 403
    response = client.post(reverse("admin:api_apikey_revoke", args=[alice_key[0].pk]))
    assert response.status_code in (403, 404)
    assert ApiKey.objects.get(pk=alice_key[0].pk).revoked_at is None
    Membership.objects.filter(user=bob).update(role=Role.OPERATOR)
    assert client.get(reverse("admin:api_apikey_changelist")).status_code == 403


def test_charlie_cannot_reach_alices_keys_in_the_admin(client, charlie, alice_key):
    client.force_login(charlie)
    assert client.get(reverse("admin:api_apikey_change", args=[alice_key[0].pk])).status_code == 404
    response = client.post(reverse("admin:api_apikey_revoke", args=[alice_key[0].pk]))
    assert response.status_code == 404
    assert ApiKey.objects.get(pk=alice_key[0].pk).revoked_at is None


def test_unknown_scopes_are_refused(alice_owner):
    from apps.api.actions import InvalidScopes

    with pytest.raises(InvalidScopes):
        create_api_key(alice_owner, "x", ["devices:read", "everything:write"])


def test_the_management_command_prints_only_the_token(alice_owner, capsys):
    from django.core.management import call_command

    call_command("api_key", "create", "--owner", "alice", "--name", "cli", "--scopes", "all")
    token = capsys.readouterr().out.strip()
    assert keys.well_formed(token)
    assert ApiClient(token).get(CAPABILITIES).status_code == 200
    call_command("api_key", "revoke", "--owner", "alice", "--prefix", token[:13])
    assert ApiClient(token).get(CAPABILITIES).status_code == 401
    assert ApiKey.objects.get(prefix=token[:13]).revoked_at <= timezone.now()
