"""Issue, rotate, revoke and re-sync devices' broker logins against a real Mosquitto (dynsec)."""

from __future__ import annotations

import pytest

from apps.devices.credentials import (
    issue_credential,
    revoke_credential,
    rotate_credential,
    sync_credential,
)
from apps.devices.models import Device, DeviceCredential, Profile
from apps.owners.models import Owner
from tests.devices.broker_kit import unique

pytestmark = pytest.mark.django_db


def lamp(owner: Owner) -> Device:
    return Device.objects.create(owner=owner, device_id=unique("lamp"), profile=Profile.ESP32_LAMP)


def password_of(device: Device) -> str:
    return DeviceCredential.objects.get(device=device).password.reveal()


def online(peers, broker, device: Device, password: str | None = None):
    peer = peers(broker, device.device_id, password or password_of(device))
    assert not peer.connect().is_failure, peer.connack
    return peer


def connected_lamp(owner, broker, peers, committed):
    """A lamp whose credential was issued (and committed), connected: (device, password, peer)."""
    device = lamp(owner)
    committed(issue_credential, device)
    password = password_of(device)
    return device, password, online(peers, broker, device, password)


def test_revocation_disconnects_a_connected_device_and_keeps_it_out(
    alice_owner, broker_settings, peers, committed
):
    device, password, peer = connected_lamp(alice_owner, broker_settings, peers, committed)

    outcome = committed(revoke_credential, device)

    assert outcome.broker == "applied", outcome
    assert peer.wait(lambda: peer.disconnects), "the broker did not disconnect the device"
    assert peers(broker_settings, device.device_id, password).connect().is_failure
    credential = DeviceCredential.objects.get(device=device)
    assert credential.revoked_at is not None
    assert not credential.password  # nothing left worth keeping
    with broker_settings.admin() as admin:
        assert (
            admin.get(
                {"command": "getRole", "rolename": f"device-{device.device_id}"}, "Role not found"
            )
            is None
        )


def test_rotation_disconnects_the_device_and_only_the_new_password_logs_in(
    alice_owner, broker_settings, peers, committed
):
    device, old, peer = connected_lamp(alice_owner, broker_settings, peers, committed)

    outcome = committed(rotate_credential, device)

    assert outcome.broker == "applied" and "password" in str(outcome), outcome
    assert peer.wait(lambda: peer.disconnects)
    new = password_of(device)
    assert new != old
    assert peers(broker_settings, device.device_id, old).connect().is_failure
    online(peers, broker_settings, device, new)


def test_a_revoked_login_comes_back_only_with_a_new_password(
    alice_owner, broker_settings, peers, committed
):
    device = lamp(alice_owner)
    committed(issue_credential, device)
    old = password_of(device)
    committed(revoke_credential, device)

    outcome = committed(issue_credential, device)

    assert outcome.broker == "applied" and "new password" in outcome.change
    assert password_of(device) != old
    assert peers(broker_settings, device.device_id, old).connect().is_failure
    online(peers, broker_settings, device)


def test_provisioning_again_changes_nothing_and_disconnects_nobody(
    alice_owner, broker_settings, spy, peers, committed
):
    device = lamp(alice_owner)
    committed(issue_credential, device)
    peer = online(peers, broker_settings, device)

    again = committed(issue_credential, device)
    synced = committed(sync_credential, device)

    assert (again.change, again.broker) == ("credential kept", "unchanged")
    assert synced.broker == "unchanged"
    peer.barrier(spy, f"home/{device.device_id}/status")  # still connected and allowed
    assert peer.disconnects == []


def test_a_broker_that_drifted_is_brought_back_in_line(
    alice_owner, broker_settings, spy, peers, committed
):
    device = lamp(alice_owner)
    committed(issue_credential, device)
    rolename = f"device-{device.device_id}"
    with broker_settings.admin() as admin:
        # Someone widened the role by hand: the device may now report for every lamp.
        (answer,) = admin.run(
            [
                {
                    "command": "addRoleACL",
                    "rolename": rolename,
                    "acltype": "publishClientSend",
                    "topic": "home/+/status",
                    "allow": True,
                    "priority": 100,
                }
            ]
        )
        assert "error" not in answer, answer
    peer = online(peers, broker_settings, device)

    outcome = committed(sync_credential, device)

    assert outcome.steps == [f"updated ACLs of role {rolename}"]
    peer.publish("home/someone-else/status", b"forged")
    peer.barrier(spy, f"home/{device.device_id}/status")
    assert spy.received("home/someone-else/status") == []
    assert peer.disconnects == []  # ACL changes apply live, without a reconnect

    with broker_settings.admin() as admin:
        admin.run([{"command": "deleteClient", "username": device.device_id}])
    assert committed(sync_credential, device).steps == [f"created client {device.device_id}"]
    online(peers, broker_settings, device)


def test_a_name_taken_by_a_client_the_platform_did_not_create_is_left_alone(
    alice_owner, broker_settings, peers, committed
):
    name = unique("legacy")
    with broker_settings.admin() as admin:
        admin.run([{"command": "createClient", "username": name, "password": "theirs"}])
    device = Device.objects.create(owner=alice_owner, device_id=name, profile=Profile.ESP32_LAMP)

    issued = committed(issue_credential, device)
    revoked = committed(revoke_credential, device)

    for outcome in (issued, revoked):
        assert outcome.failed and "did not create" in outcome.error, outcome
    assert not peers(broker_settings, name, "theirs").connect().is_failure


def test_an_unreachable_broker_is_reported_and_the_next_sync_repairs_it(
    alice_owner, broker_settings, settings, peers, caplog, committed
):
    device = lamp(alice_owner)
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"  # discard port: refused at once

    outcome = committed(issue_credential, device)

    assert outcome.failed
    assert "cannot reach the broker at mqtt://127.0.0.1:9" in outcome.error
    assert f"provision_broker --device {device.device_id}" in caplog.text
    assert DeviceCredential.objects.filter(device=device).exists()  # the database went first

    settings.MQTT_ADMIN_URL = broker_settings.url
    assert committed(sync_credential, device).broker == "applied"
    online(peers, broker_settings, device)


def test_a_wrong_admin_login_or_a_non_admin_is_a_clear_error(
    alice_owner, broker_settings, settings, monkeypatch, committed
):
    monkeypatch.setattr("apps.devices.broker.TIMEOUT", 1.0)
    device = lamp(alice_owner)
    settings.MQTT_ADMIN_PASSWORD = "not-the-password"
    outcome = committed(issue_credential, device)
    assert "refused the login of 'dynsec-admin'" in outcome.error

    # The platform's own client is not the dynsec admin: its commands go unanswered.
    settings.MQTT_ADMIN_USERNAME = "platform-spy"
    settings.MQTT_ADMIN_PASSWORD = broker_settings.spy_password
    outcome = committed(sync_credential, device)
    assert "no answer from the dynamic-security plugin" in outcome.error
    assert "is 'platform-spy' its admin?" in outcome.error


def test_a_group_added_by_hand_is_removed_but_a_stale_description_disturbs_nobody(
    alice_owner, broker_settings, peers, committed
):
    device = lamp(alice_owner)
    committed(issue_credential, device)
    name, group = device.device_id, unique("wide")
    with broker_settings.admin() as admin:
        get = {"command": "getClient", "username": name}
        description = admin.get(get, "")["client"]["textdescription"]
        answers = admin.run(
            [
                # An owner renamed since: the description is stale, the password digest is not.
                {
                    "command": "modifyClient",
                    "username": name,
                    "textdescription": description.replace("owner=alice", "owner=old"),
                },
                # A group that would let the device read and write everything.
                {"command": "createGroup", "groupname": group, "roles": [{"rolename": "platform"}]},
            ]
        )
        assert not any("error" in a for a in answers), answers
    peer = online(peers, broker_settings, device)

    assert committed(sync_credential, device).broker == "unchanged"
    assert peer.disconnects == []

    with broker_settings.admin() as admin:
        admin.run([{"command": "addGroupClient", "groupname": group, "username": name}])
        outcome = committed(sync_credential, device)
        assert outcome.steps == [f"updated roles of client {name} (disconnected)"]
        assert admin.get(get, "")["client"]["groups"] == []


def test_deleting_a_device_removes_its_login_and_disconnects_it(
    alice_owner, broker_settings, peers, committed
):
    device, password, peer = connected_lamp(alice_owner, broker_settings, peers, committed)

    committed(device.delete)  # as the admin and the API delete, cascading to the credential

    assert peer.wait(lambda: peer.disconnects), "the broker did not disconnect the device"
    assert peers(broker_settings, device.device_id, password).connect().is_failure
    with broker_settings.admin() as admin:
        for command, missing in (
            ({"command": "getClient", "username": device.device_id}, "Client not found"),
            ({"command": "getRole", "rolename": f"device-{device.device_id}"}, "Role not found"),
        ):
            assert admin.get(command, missing) is None


def test_a_login_re_issued_under_the_same_name_is_not_removed_by_an_old_deletion(
    alice_owner, broker_settings, peers, committed
):
    from apps.devices.credentials import remove_logins

    old = lamp(alice_owner)
    name = old.device_id
    old.delete()  # never committed here: its after-commit removal is not run
    again = Device.objects.create(owner=alice_owner, device_id=name, profile=Profile.ESP32_LAMP)
    committed(issue_credential, again)

    assert remove_logins([name]) == []  # the late removal of the old one leaves the new login
    online(peers, broker_settings, again)  # still logs in


def test_a_deleted_devices_login_is_removed_by_its_owners_deletion_too(
    broker_settings, peers, committed
):
    owner = Owner.objects.create(name="Gone", slug=unique("gone"))
    device = lamp(owner)
    committed(issue_credential, device)
    peer = online(peers, broker_settings, device)

    committed(owner.delete)

    assert peer.wait(lambda: peer.disconnects), "the broker did not disconnect the device"


def test_devices_deleted_together_lose_their_logins_in_one_go(
    alice_owner, broker_settings, peers, committed
):
    devices = [lamp(alice_owner) for _ in range(3)]
    for device in devices:
        committed(issue_credential, device)
    connected = [online(peers, broker_settings, d) for d in devices]

    committed(Device.objects.filter(pk__in=[d.pk for d in devices]).delete)  # the admin's bulk

    for peer in connected:
        assert peer.wait(lambda p=peer: p.disconnects), "a deleted device stayed connected"


def test_a_deletion_while_the_broker_is_down_is_logged_and_pruned_later(
    alice_owner, broker_settings, settings, peers, caplog, committed
):
    from apps.devices.credentials import broker_session, prune

    device = lamp(alice_owner)
    committed(issue_credential, device)
    password = password_of(device)
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"  # discard port: refused at once

    committed(device.delete)  # the deletion itself succeeds

    assert "provision_broker --all" in caplog.text and device.device_id in caplog.text
    settings.MQTT_ADMIN_URL = broker_settings.url
    assert peers(broker_settings, device.device_id, password).connect().is_failure is False
    with broker_session() as admin:
        assert f"deleted orphan client {device.device_id} (disconnected)" in prune(admin)
    assert peers(broker_settings, device.device_id, password).connect().is_failure


def test_the_periodic_prune_removes_a_login_the_broker_kept_after_a_deletion(
    alice_owner, broker_settings, settings, peers, caplog, committed
):
    from apps.devices.tasks import prune_logins

    device = lamp(alice_owner)
    committed(issue_credential, device)
    password = password_of(device)
    kept = lamp(alice_owner)
    committed(issue_credential, kept)
    settings.MQTT_ADMIN_URL = "mqtt://127.0.0.1:9"  # the broker's admin is unreachable
    committed(device.delete)

    # While it stays unreachable the prune says so and changes nothing.
    assert prune_logins() == []
    assert "broker logins not pruned" in caplog.text
    settings.MQTT_ADMIN_URL = broker_settings.url
    assert peers(broker_settings, device.device_id, password).connect().is_failure is False

    done = prune_logins()

    assert f"deleted orphan client {device.device_id} (disconnected)" in done
    assert f"deleted orphan role device-{device.device_id}" in done
    assert not any(kept.device_id in step for step in done)
    assert peers(broker_settings, device.device_id, password).connect().is_failure
    online(peers, broker_settings, kept)  # the other device's login is untouched
    assert prune_logins() == []  # nothing left to do


def test_beat_runs_the_prune_every_broker_prune_minutes(settings):
    from iotplatform.celery import app

    entry = app.conf.beat_schedule["devices.prune_logins"]
    assert entry["task"] == "devices.prune_logins"
    assert entry["schedule"] == settings.BROKER_PRUNE_MINUTES * 60


def test_a_deletion_waits_only_briefly_for_a_broker_that_does_not_answer(
    alice_owner, broker_settings, settings, caplog, committed
):
    # The removal runs in the request that deleted the device: a broker that takes the TCP
    # connection but never answers (a hung Mosquitto, a black-holing firewall) holds the
    # request for the short timeout only, not the admin connection's usual 10 s.
    import socket

    from apps.devices.credentials import REMOVE_AFTER_DELETE_TIMEOUT

    device = lamp(alice_owner)
    committed(issue_credential, device)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts connections; nobody ever answers
        settings.MQTT_ADMIN_URL = f"mqtt://127.0.0.1:{silent.getsockname()[1]}"

        committed(device.delete)

    assert f"within {REMOVE_AFTER_DELETE_TIMEOUT:g} s" in caplog.text
    assert device.device_id in caplog.text
    assert not DeviceCredential.objects.filter(username=device.device_id).exists()
