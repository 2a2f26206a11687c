"""`manage.py provision_broker` against a real Mosquitto (dynsec): what it does and prints."""

from __future__ import annotations

import json
import logging
import os
import stat
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.devices.credentials import issue_credential, revoke_credential
from apps.devices.models import Device, DeviceCredential, Profile
from apps.owners.models import Owner
from tests.devices.broker_kit import unique

# Transactional: the command prints each outcome after its commit, when the broker was told.
COMMITTING = pytest.mark.django_db(transaction=True)


def provision(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("provision_broker", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def device(owner: Owner, profile: str = Profile.ESP32_LAMP, topic: str = "") -> Device:
    return Device.objects.create(
        owner=owner, device_id=unique(profile[:4]), profile=profile, topic=topic
    )


def password_of(d: Device) -> str:
    return DeviceCredential.objects.get(device=d).password.reveal()


@COMMITTING
def test_it_provisions_devices_and_says_what_it_did(alice_owner, broker_settings, peers):
    a, b = device(alice_owner), device(alice_owner, Profile.METER_V2)

    out, _ = provision("--device", a.device_id, "--device", b.device_id)

    assert f"{a.device_id}: credential issued; broker: created role device-{a.device_id}" in out
    assert f"created client {b.device_id}" in out
    for d in (a, b):
        assert not peers(broker_settings, d.device_id, password_of(d)).connect().is_failure

    again, _ = provision("--device", a.device_id)
    assert again.strip() == f"{a.device_id}: credential kept; broker: already up to date"


@COMMITTING
def test_all_issues_missing_logins_and_removes_orphaned_ones(
    alice_owner, charlie_owner, broker_settings, peers, settings
):
    kept, new, gone = device(alice_owner), device(charlie_owner), device(alice_owner)
    issue_credential(kept)
    issue_credential(gone)
    gone_password = password_of(gone)
    gone_peer = peers(broker_settings, gone.device_id, gone_password)
    assert not gone_peer.connect().is_failure
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"  # the broker is away when it is deleted:
    gone.delete()  # its login outlives it
    settings.MQTT_ADMIN_URL = broker_settings.url
    assert not peers(broker_settings, gone.device_id, gone_password).connect().is_failure

    out, _ = provision("--all")

    assert f"{kept.device_id}: credential kept; broker: already up to date" in out
    assert f"{new.device_id}: credential issued" in out
    assert f"broker: deleted orphan client {gone.device_id} (disconnected)" in out
    assert f"broker: deleted orphan role device-{gone.device_id}" in out
    assert gone_peer.wait(lambda: gone_peer.disconnects)
    assert peers(broker_settings, gone.device_id, gone_password).connect().is_failure


@COMMITTING
def test_all_keeps_revoked_devices_out_and_catches_up_a_missed_revocation(
    alice_owner, broker_settings, settings, peers
):
    d = device(alice_owner)
    issue_credential(d)
    password = password_of(d)
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"
    assert revoke_credential(d).failed  # the broker never heard of the revocation…
    settings.MQTT_ADMIN_URL = broker_settings.url
    assert not peers(broker_settings, d.device_id, password).connect().is_failure

    out, _ = provision("--all")

    assert f"{d.device_id}: credential revoked; broker: deleted client {d.device_id}" in out
    assert DeviceCredential.objects.get(device=d).revoked_at is not None  # …and stays revoked
    assert peers(broker_settings, d.device_id, password).connect().is_failure
    again, _ = provision("--all")
    assert f"{d.device_id}: credential revoked; broker: already up to date" in again


@COMMITTING
def test_a_dry_run_changes_nothing(alice_owner, broker_settings, peers):
    fresh, active = device(alice_owner), device(alice_owner)
    issue_credential(active)
    password = password_of(active)
    peer = peers(broker_settings, active.device_id, password)
    assert not peer.connect().is_failure

    out, _ = provision("--all", "--dry-run")
    rotate_out, _ = provision("--rotate", active.device_id, "--dry-run")
    revoke_out, _ = provision("--revoke", active.device_id, "--dry-run")

    dry = "broker, not done (dry run)"
    assert f"{fresh.device_id}: would issue a credential; {dry}: created role" in out
    assert f"created client {fresh.device_id}" in out
    assert f"{active.device_id}: credential kept; {dry}: already up to date" in out
    assert f"would rotate the password; {dry}: updated password of client" in rotate_out
    assert f"would revoke the credential; {dry}: deleted client {active.device_id}" in revoke_out
    assert not DeviceCredential.objects.filter(device=fresh).exists()
    assert password_of(active) == password
    assert DeviceCredential.objects.get(device=active).revoked_at is None
    with broker_settings.admin() as admin:
        get = {"command": "getClient", "username": fresh.device_id}
        assert admin.get(get, "Client not found") is None
    assert peer.disconnects == []


@COMMITTING
def test_no_password_ever_reaches_the_output_or_any_log(alice_owner, broker_settings, caplog):
    caplog.set_level(logging.DEBUG)
    d = device(alice_owner, Profile.TASMOTA, topic=unique("Plug"))
    seen: list[str] = []
    outputs: list[str] = []

    for args in (["--device"], ["--rotate"], ["--device"], ["--rotate"], ["--revoke"]):
        outputs += provision(*args, d.device_id)
        if args != ["--revoke"]:
            seen.append(password_of(d))
    outputs += provision("--all")
    outputs += provision("--device", d.device_id)  # asked for explicitly: a new login
    seen.append(password_of(d))

    assert len(set(seen)) == 4  # issued, rotated, (kept), rotated, re-issued
    text = "\n".join(outputs) + caplog.text + broker_settings.log_text()
    assert "created client" in text  # the texts are there…
    for password in seen:
        assert password not in text  # …the passwords are not


@pytest.mark.django_db  # checks the database and the file only
def test_secret_file_hands_over_one_login_privately(alice_owner, broker_settings, tmp_path):
    d = device(alice_owner)
    path = tmp_path / "login.json"

    out, _ = provision("--device", d.device_id, "--secret-file", str(path))

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    login = json.loads(path.read_text())
    assert login == {"device_id": d.device_id, "username": d.device_id, "password": password_of(d)}
    assert login["password"] not in out
    with pytest.raises(CommandError, match="must be new"):
        provision("--rotate", d.device_id, "--secret-file", str(path))
    with pytest.raises(CommandError, match="exactly one"):
        provision("--all", "--secret-file", str(tmp_path / "all.json"))


@pytest.mark.django_db  # checks the database and the file only
def test_a_refused_device_is_reported_and_the_others_go_on(alice_owner, broker_settings):
    good = device(alice_owner)
    # Topic "home" would make the FullTopic variant `home/stat/#` reach lamps' topics.
    bad = device(alice_owner, Profile.TASMOTA, topic="home")

    with pytest.raises(CommandError, match="1 problem"):
        provision("--device", bad.device_id, "--device", good.device_id)

    assert not DeviceCredential.objects.filter(device=bad).exists()
    assert DeviceCredential.objects.filter(device=good).exists()


@pytest.mark.django_db  # checks the database and the file only
def test_unknown_devices_and_a_missing_broker_admin_change_nothing(
    alice_owner, broker_settings, settings
):
    d = device(alice_owner)
    with pytest.raises(CommandError, match="no device with id nope-1"):
        provision("--device", d.device_id, "--device", "nope-1")

    settings.MQTT_ADMIN_PASSWORD = ""
    with pytest.raises(CommandError, match="set MQTT_ADMIN_PASSWORD"):
        provision("--device", d.device_id)

    settings.MQTT_ADMIN_PASSWORD = broker_settings.admin_password
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"
    with pytest.raises(CommandError, match="cannot reach the broker.*nothing changed"):
        provision("--device", d.device_id)
    assert not DeviceCredential.objects.exists()
