"""Actions on devices' broker logins: issue, rotate, revoke (SPEC §9).

Each action changes the database in one transaction, then — after commit — makes the broker
match what the database now says (`apps.devices.broker`). The database goes first because it
is the source of truth: if the broker is down, the outcome says so (`broker == "failed"`) and
`manage.py provision_broker` brings the broker in line later, from the database. The other
order could leave a password in the broker that the platform no longer knows.

The after-commit step reads the rows again, so two actions racing on one device leave the
broker with whatever the database holds last. Passwords never leave as text except to the broker
(and to an explicitly requested secret file, see `provision_broker --secret-file`).
"""

from __future__ import annotations

import logging
import secrets
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django.utils import timezone

from apps.core.crypto import Secret

from . import broker
from .broker import BrokerError, BrokerNotConfigured, DynsecAdmin, Step, UnsafeDevice
from .models import Device, DeviceCredential
from .mqtt import mqtt_params

logger = logging.getLogger(__name__)

# 32 characters (192 bits): fits Tasmota's MqttPassword and every MQTT client we know.
PASSWORD_BYTES = 24


class CredentialRefused(Exception):
    """The action was refused before anything changed."""


@dataclass
class Outcome:
    """What an action did: `change` in the database, then `broker` once the commit happened.

    broker: "pending" (inside an outer transaction, not committed yet), "applied", "unchanged"
    (already in line), "skipped" (no broker admin configured) or "failed" (see `error`).
    """

    device_id: str
    change: str
    broker: str = "pending"
    steps: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.broker == "failed"

    def __str__(self) -> str:
        if self.broker == "applied":
            done = ", ".join(self.steps)
        elif self.broker == "unchanged":
            done = "already up to date"
        elif self.broker in ("failed", "skipped"):
            done = f"{self.broker.upper()}: {self.error}"
        else:
            done = self.broker
        return f"{self.device_id}: {self.change}; broker: {done}"


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def check_provisionable(device: Device) -> None:
    """Refuse devices that must not get a login: overlapping topics, the platform's own names."""
    try:
        broker.device_topics(device)
    except UnsafeDevice as exc:
        raise CredentialRefused(str(exc)) from None
    platform_user = mqtt_params(settings.MQTT_URL)["username"]
    if device.device_id in {settings.MQTT_ADMIN_USERNAME, platform_user}:
        raise CredentialRefused(
            f"{device.device_id}: the broker login of the platform itself; rename the device"
        )


def issue_credential(device: Device, *, admin: DynsecAdmin | None = None) -> Outcome:
    """Give the device a login if it has none (or a new one if it was revoked), then sync.

    Idempotent: an active credential is kept as it is, and the broker is brought in line with it.
    """
    check_provisionable(device)
    with transaction.atomic():
        device = _lock(device)
        credential = DeviceCredential.objects.filter(device=device).first()
        if credential is None:
            taken = DeviceCredential.objects.filter(username=device.device_id).first()
            if taken is not None:
                raise CredentialRefused(
                    f"{device.device_id}: the username is already used by device "
                    f"{taken.device.device_id}'s credential"
                )
            DeviceCredential.objects.create(
                owner=device.owner,
                device=device,
                username=device.device_id,
                password=new_password(),
            )
            change = "credential issued"
        elif credential.revoked_at is not None:
            # A revoked password never comes back: a re-issued login gets a new one.
            credential.password = new_password()
            credential.revoked_at = None
            credential.save(update_fields=["password", "revoked_at"])
            change = "revoked credential re-issued with a new password"
        else:
            change = "credential kept"
        return _after_commit(device, change, admin)


def rotate_credential(
    device: Device, *, password: str | None = None, admin: DynsecAdmin | None = None
) -> Outcome:
    """A new password (generated, or the one given): the broker disconnects the device, and its
    old password no longer logs in."""
    check_provisionable(device)
    if password is not None and (not password or "\x00" in password or len(password) > 4096):
        raise CredentialRefused(f"{device.device_id}: a password must be 1-4096 characters, no NUL")
    with transaction.atomic():
        device = _lock(device)
        credential = DeviceCredential.objects.filter(device=device).first()
        if credential is None:
            raise CredentialRefused(f"{device.device_id}: no credential to rotate; issue one")
        credential.password = password if password is not None else new_password()
        credential.revoked_at = None
        credential.save(update_fields=["password", "revoked_at"])
        return _after_commit(device, "password rotated", admin)


def revoke_credential(device: Device, *, admin: DynsecAdmin | None = None) -> Outcome:
    """Revoke the device's login: the broker deletes its client, which disconnects it."""
    with transaction.atomic():
        device = _lock(device)
        credential = DeviceCredential.objects.filter(device=device).first()
        if credential is None:
            change = "no credential"
        elif credential.revoked_at is not None:
            change = "credential already revoked"
        else:
            credential.revoked_at = timezone.now()
            credential.password = ""  # useless from now on; nothing worth keeping at rest
            credential.save(update_fields=["revoked_at", "password"])
            change = "credential revoked"
        # Synced even when nothing changed here: a broker that missed the revocation catches up.
        return _after_commit(device, change, admin)


def sync_credential(device: Device, *, admin: DynsecAdmin | None = None) -> Outcome:
    """Bring the broker in line with the database for one device, changing nothing here.

    A revoked credential stays revoked (its client is deleted); only `issue_credential`, asked
    for one device explicitly, gives a revoked device a login again.
    """
    credential = DeviceCredential.objects.filter(device=device).first()
    if credential is None:
        change = "no credential"
    elif credential.revoked_at is not None:
        change = "credential revoked"
    else:
        change = "credential kept"
    with transaction.atomic():
        return _after_commit(device, change, admin)


def plan_credential(device: Device, admin: DynsecAdmin, action: str) -> tuple[str, list[Step]]:
    """What `action` ("issue", "rotate", "revoke", "sync") would change, changing nothing."""
    credential = DeviceCredential.objects.filter(device=device).first()
    active = credential is not None and credential.revoked_at is None
    if action == "revoke":
        change = "would revoke the credential" if active else "no active credential"
        return change, broker.plan(admin, _username(device, credential), None)
    if action == "sync" and not active:
        change = "credential revoked" if credential is not None else "no credential"
        return change, broker.plan(admin, _username(device, credential), None)
    check_provisionable(device)
    password: Secret | None = None
    if action == "rotate":
        if credential is None:
            raise CredentialRefused(f"{device.device_id}: no credential to rotate; issue one")
        change = "would rotate the password"
    elif credential is None:
        change = "would issue a credential"
    elif not active:
        change = "would re-issue the revoked credential with a new password"
    else:
        change, password = "credential kept", credential.password
    uuid = credential.uuid if credential is not None else None
    username = _username(device, credential)
    return change, broker.plan(
        admin, username, broker.desired_state(device, username, uuid, password)
    )


def prune(admin: DynsecAdmin, *, dry_run: bool = False) -> list[str]:
    """Delete platform-made clients and roles that no active credential accounts for (devices
    deleted, revocations the broker missed). Returns what was (or would be) deleted."""
    clients, roles = broker.managed(admin)
    active = set(
        DeviceCredential.objects.filter(revoked_at__isnull=True).values_list("username", flat=True)
    )
    steps = [
        Step(
            f"deleted orphan client {u} (disconnected)", {"command": "deleteClient", "username": u}
        )
        for u in sorted(clients - active)
    ]
    wanted_roles = {broker.role_name(u) for u in active}
    steps += [
        Step(f"deleted orphan role {r}", {"command": "deleteRole", "rolename": r})
        for r in sorted(roles - wanted_roles)
    ]
    if not dry_run:
        broker.apply(admin, steps)
    return [s.text for s in steps]


# Usernames of credentials deleted in the current transaction, per database connection (one
# per thread): removed from the broker together, in one broker session, after the commit.
_deleted_logins: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@receiver(post_delete, sender=DeviceCredential, dispatch_uid="devices.credential_deleted")
def _credential_deleted(sender: type, instance: DeviceCredential, using: str, **kw: Any) -> None:
    """A deleted credential (its device deleted, in the admin, the API or a cascade from its
    owner) loses its broker login once the deletion commits: the device is disconnected and
    cannot log in again. Without this its login lived on until `provision_broker --all`."""
    connection = transaction.get_connection(using)
    _deleted_logins.setdefault(connection, set()).add(instance.username)
    # One callback per row; the first after the commit removes them all. Names left by a
    # transaction that rolled back are taken by the next one: remove_logins skips any that
    # still has its active credential.
    transaction.on_commit(partial(_remove_deleted, connection), using=using)


# The removal after a deletion runs in the request that deleted (admin, API): it waits for a
# broker that does not answer this long, not the admin connection's usual 10 s. What it misses,
# the periodic prune (`tasks.prune_logins`) removes.
REMOVE_AFTER_DELETE_TIMEOUT = 3.0


def _remove_deleted(connection: Any) -> None:
    usernames = _deleted_logins.pop(connection, set())
    if usernames:
        remove_logins(sorted(usernames), timeout=REMOVE_AFTER_DELETE_TIMEOUT)


def remove_logins(usernames: list[str], timeout: float | None = None) -> list[str]:
    """Delete logins the database no longer has from the broker; what was done, in words.

    A username is left alone when an active credential has it again by now (a device re-created
    under the same id meanwhile). One broker session for all; a broker that is down or not
    configured is logged, and the periodic prune (`tasks.prune_logins`) or `provision_broker
    --all` removes the logins later (orphans)."""
    active = set(
        DeviceCredential.objects.filter(
            username__in=usernames, revoked_at__isnull=True
        ).values_list("username", flat=True)
    )
    gone = [u for u in usernames if u not in active]
    if not gone:
        return []
    done: list[str] = []
    try:
        with DynsecAdmin.from_settings(timeout) as admin:
            for username in gone:
                steps = broker.plan(admin, username, None)
                broker.apply(admin, steps)
                done += [s.text for s in steps]
    except BrokerNotConfigured:
        return done
    except BrokerError as exc:
        logger.warning(
            "broker login of deleted credential not removed usernames=%s error=%r; the periodic "
            "prune (BROKER_PRUNE_MINUTES) or `manage.py provision_broker --all` removes them",
            ",".join(gone),
            str(exc),
        )
    return done


@contextmanager
def broker_session() -> Iterator[DynsecAdmin | None]:
    """One admin connection for a batch of actions; None when no broker admin is configured."""
    try:
        admin = DynsecAdmin.from_settings()
    except BrokerNotConfigured:
        yield None
        return
    with admin:
        yield admin


# --- internals -----------------------------------------------------------------------------------


def _lock(device: Device) -> Device:
    # Serialises actions on one device (PostgreSQL); SQLite serialises every writer anyway.
    return Device.objects.select_for_update().select_related("owner").get(pk=device.pk)


def _username(device: Device, credential: DeviceCredential | None) -> str:
    return credential.username if credential is not None else device.device_id


def _after_commit(device: Device, change: str, admin: DynsecAdmin | None) -> Outcome:
    outcome = Outcome(device.device_id, change)
    transaction.on_commit(partial(_push, outcome, device.pk, admin))
    return outcome


def _push(outcome: Outcome, device_pk: int, admin: DynsecAdmin | None) -> None:
    try:
        if admin is None:
            with DynsecAdmin.from_settings() as own:
                steps = _sync(own, device_pk)
        else:
            steps = _sync(admin, device_pk)
    except BrokerNotConfigured as exc:
        outcome.broker, outcome.error = "skipped", str(exc)
    except (BrokerError, UnsafeDevice) as exc:  # UnsafeDevice: its topic changed since issued
        outcome.broker, outcome.error = "failed", str(exc)
        logger.warning(
            "broker credential sync failed device=%s error=%r; the database is ahead of the "
            "broker until `manage.py provision_broker --device %s` succeeds",
            outcome.device_id,
            str(exc),
            outcome.device_id,
        )
    else:
        outcome.broker = "applied" if steps else "unchanged"
        outcome.steps = [s.text for s in steps]


def _sync(admin: DynsecAdmin, device_pk: int) -> list[Step]:
    device = Device.objects.select_related("owner").get(pk=device_pk)
    credential = DeviceCredential.objects.filter(device_id=device_pk).first()
    username = _username(device, credential)
    desired = None
    if credential is not None and credential.revoked_at is None:
        if not credential.password:
            raise BrokerError(f"{username}: the stored credential has no password; rotate it")
        desired = broker.desired_state(device, username, credential.uuid, credential.password)
    steps = broker.plan(admin, username, desired)
    broker.apply(admin, steps)
    return steps
