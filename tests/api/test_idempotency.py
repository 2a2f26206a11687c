"""Idempotency-Key: replay, 422 on another body, 409 while in flight, per-key scoping, expiry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.api import actions
from apps.api.models import IdempotencyRecord, IdempotencyState
from apps.devices.models import Device

from .conftest import ApiClient, make_key

pytestmark = pytest.mark.django_db

DEVICES = "/api/v1/devices/"


def new_device(device_id: str) -> dict:
    return {"device_id": device_id, "profile": "esp32-lamp", "name": "Hall"}


def test_the_same_key_and_body_replays_the_stored_answer_without_running_again(alice_api):
    first = alice_api.post(DEVICES, new_device("idem-lamp-1"), idem="create-hall-lamp")
    again = alice_api.post(DEVICES, new_device("idem-lamp-1"), idem="create-hall-lamp")
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first
    assert Device.objects.filter(device_id="idem-lamp-1").count() == 1


def test_json_bodies_are_compared_canonically(alice_api):
    alice_api.post(DEVICES, {"device_id": "idem-lamp-2", "profile": "esp32-lamp"}, idem="k")
    # Same object, other key order and spacing: the same request.
    again = alice_api.client.post(
        DEVICES,
        data='{ "profile" : "esp32-lamp",  "device_id": "idem-lamp-2" }',
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {alice_api.token}",
        HTTP_IDEMPOTENCY_KEY="k",
    )
    assert again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"


def test_the_same_key_with_another_body_is_422_and_changes_nothing(alice_api):
    alice_api.post(DEVICES, new_device("idem-lamp-3"), idem="reused")
    other = alice_api.post(DEVICES, new_device("idem-lamp-4"), idem="reused")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert not Device.objects.filter(device_id="idem-lamp-4").exists()


def test_the_same_key_on_another_route_is_422(alice_api, alice_lamp):
    alice_api.post(DEVICES, new_device("idem-lamp-5"), idem="one-key")
    other = alice_api.patch(f"{DEVICES}{alice_lamp.device_id}/", {"name": "x"}, idem="one-key")
    assert other.status_code == 422


def test_a_key_still_in_flight_is_409_with_retry_after(alice_api, alice_key):
    key, _token = alice_key
    now = timezone.now()
    # What the first request's claim looks like while its view still runs.
    IdempotencyRecord.objects.create(
        owner=key.owner,
        api_key=key,
        key="busy",
        fingerprint=_fingerprint_of_create(key),
        method="POST",
        path=DEVICES,
        state=IdempotencyState.IN_FLIGHT,
        claim="x" * 32,
        claimed_at=now,
        created_at=now,
    )
    response = alice_api.post(DEVICES, new_device("idem-lamp-6"), idem="busy")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_key_in_flight"
    assert response["Retry-After"] == "1"
    assert not Device.objects.filter(device_id="idem-lamp-6").exists()


def _fingerprint_of_create(key) -> str:
    """The fingerprint the API computes for POST /devices/ with new_device("idem-lamp-6")."""
    import json

    from django.test import RequestFactory
    from rest_framework.request import Request

    from apps.api.idempotency import fingerprint

    raw = RequestFactory().post(
        DEVICES, data=json.dumps(new_device("idem-lamp-6")), content_type="application/json"
    )
    return fingerprint(Request(raw))


def test_a_stale_claim_of_a_crashed_request_is_taken_over(alice_api, alice_key):
    # The crashed request's transaction rolled back with it, so running again is safe.
    key, _token = alice_key
    long_ago = timezone.now() - timedelta(minutes=30)
    IdempotencyRecord.objects.create(
        owner=key.owner,
        api_key=key,
        key="crashed",
        fingerprint=_fingerprint_of_create(key),
        method="POST",
        path=DEVICES,
        state=IdempotencyState.IN_FLIGHT,
        claim="y" * 32,
        claimed_at=long_ago,
        created_at=long_ago,
    )
    response = alice_api.post(DEVICES, new_device("idem-lamp-6"), idem="crashed")
    assert response.status_code == 201
    assert IdempotencyRecord.objects.get(key="crashed").state == IdempotencyState.DONE


def test_keys_are_scoped_per_api_key(alice_api, alice_owner, charlie_api):
    alice_api.post(DEVICES, new_device("idem-alice-1"), idem="shared-name")
    # Charlie (another owner) uses the same key string: independent, his request runs.
    charlie = charlie_api.post(DEVICES, new_device("idem-charlie-1"), idem="shared-name")
    assert charlie.status_code == 201
    assert "Idempotent-Replayed" not in charlie
    # A second key of alice's own owner is independent too.
    _key, token = make_key(alice_owner, ["devices:write"], name="second")
    second = ApiClient(token).post(DEVICES, new_device("idem-alice-2"), idem="shared-name")
    assert second.status_code == 201
    assert "Idempotent-Replayed" not in second
    assert Device.objects.filter(device_id__in=["idem-alice-2", "idem-charlie-1"]).count() == 2


def test_validation_errors_are_stored_and_replayed(alice_api):
    bad = {"device_id": "Not Valid!", "profile": "esp32-lamp"}
    first = alice_api.post(DEVICES, bad, idem="bad-body")
    again = alice_api.post(DEVICES, bad, idem="bad-body")
    assert first.status_code == again.status_code == 400
    assert again["Idempotent-Replayed"] == "true"
    assert first.json()["error"]["fields"]["device_id"]


def test_a_server_error_is_not_stored_and_leaves_nothing_behind(alice_api, monkeypatch):
    from apps.api.resources.devices import DeviceViewSet

    def explode(self, device, serializer):
        device.save()  # an effect that must be rolled back with the failed request
        raise RuntimeError("boom")

    monkeypatch.setattr(DeviceViewSet, "_save", explode)
    failed = alice_api.post(DEVICES, new_device("idem-lamp-7"), idem="retry-me")
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "server_error"
    assert not Device.objects.filter(device_id="idem-lamp-7").exists()
    assert not IdempotencyRecord.objects.filter(key="retry-me").exists()
    monkeypatch.undo()
    retried = alice_api.post(DEVICES, new_device("idem-lamp-7"), idem="retry-me")
    assert retried.status_code == 201
    assert "Idempotent-Replayed" not in retried


def test_refused_requests_do_not_use_up_the_key(alice_owner):
    _key, token = make_key(alice_owner, ["devices:read"], name="read only")
    refused = ApiClient(token).post(DEVICES, new_device("idem-lamp-8"), idem="k403")
    assert refused.status_code == 403
    assert not IdempotencyRecord.objects.filter(key="k403").exists()


def test_malformed_keys_are_400(alice_api):
    response = alice_api.post(DEVICES, new_device("idem-lamp-9"), idem="has space")
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["fields"]


def test_reads_ignore_the_header(alice_api):
    response = alice_api.request("GET", DEVICES, idem="whatever")
    assert response.status_code == 200
    assert not IdempotencyRecord.objects.exists()


def test_keys_are_kept_a_day_then_cleaned_up(alice_api):
    alice_api.post(DEVICES, new_device("idem-lamp-10"), idem="old")
    record = IdempotencyRecord.objects.get(key="old")
    actions.cleanup(now=record.created_at + timedelta(hours=23))
    assert IdempotencyRecord.objects.filter(key="old").exists()
    # Expired but not yet cleaned up: the key counts as new.
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        created_at=timezone.now() - timedelta(hours=25)
    )
    again = alice_api.post(DEVICES, new_device("idem-lamp-11"), idem="old")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again
    IdempotencyRecord.objects.filter(key="old").update(
        created_at=timezone.now() - timedelta(hours=25)
    )
    records, _ = actions.cleanup()
    assert records == 1
