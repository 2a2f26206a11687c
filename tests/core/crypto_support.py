"""Keys and credentials shared by the secrets-at-rest tests (test_crypto, test_rotate_keys)."""

from __future__ import annotations

import base64
import os

from django.db import connection

from apps.devices.models import Device, DeviceCredential, Profile
from apps.owners.models import Owner


def make_key(key_id: str) -> str:
    return f"{key_id}:{base64.urlsafe_b64encode(os.urandom(32)).decode()}"


OLD_KEY = make_key("old")
NEW_KEY = make_key("new")


def make_credential(owner: Owner, device_id: str, password: str) -> DeviceCredential:
    device = Device.objects.create(owner=owner, device_id=device_id, profile=Profile.ESP32_LAMP)
    return DeviceCredential.objects.create(
        owner=owner, device=device, username=f"u-{device_id}", password=password
    )


def stored_value(credential: DeviceCredential) -> str:
    """The password column exactly as the database holds it (bypassing the field)."""
    table = DeviceCredential._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT password FROM {table} WHERE id = %s", [credential.pk])  # noqa: S608
        return cursor.fetchone()[0]


def overwrite_stored_value(credential: DeviceCredential, token: str) -> None:
    """Write a raw column value, as someone with database access could."""
    table = DeviceCredential._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET password = %s WHERE id = %s", [token, credential.pk])  # noqa: S608
