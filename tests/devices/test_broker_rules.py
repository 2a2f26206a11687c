"""Broker credential rules that need no broker: ACLs per profile, refusals, secrecy, no admin."""

from __future__ import annotations

import pytest

from apps.core.crypto import Secret
from apps.devices import broker
from apps.devices.broker import BrokerNotConfigured, DynsecAdmin, Step
from apps.devices.credentials import (
    CredentialRefused,
    Outcome,
    issue_credential,
    new_password,
    revoke_credential,
    rotate_credential,
)
from apps.devices.models import Device, DeviceCredential, Profile


def allowed(acls: list[dict], acltype: str) -> set[str]:
    return {a["topic"] for a in acls if a["acltype"] == acltype and a["allow"]}


def test_each_profile_gets_exactly_its_own_topics(alice_lamp, alice_relay, alice_meter):
    lamp = broker.device_acls(alice_lamp)
    assert allowed(lamp, "publishClientSend") == {
        "home/alice-lamp-1/status",
        "home/alice-lamp-1/lwt",
    }
    assert allowed(lamp, "subscribePattern") == {"home/alice-lamp-1/cmd"}
    assert allowed(lamp, "publishClientReceive") == {"home/alice-lamp-1/cmd"}

    relay = broker.device_acls(alice_relay)
    t = "tasmota_A1B2C3"
    assert allowed(relay, "publishClientSend") == {
        f"stat/{t}/#",
        f"tele/{t}/#",
        f"{t}/stat/#",
        f"{t}/tele/#",
    }
    assert allowed(relay, "subscribePattern") == {f"cmnd/{t}/#", f"{t}/cmnd/#"}

    meter = broker.device_acls(alice_meter)
    assert allowed(meter, "publishClientSend") == {
        f"iot/alice-meter-1/{c}"
        for c in ("telemetry", "hello", "status", "command/ack", "ota/status")
    }
    assert allowed(meter, "subscribePattern") == {"iot/alice-meter-1/command"}


def test_every_role_denies_everything_else_below_its_allowances(alice_lamp):
    acls = broker.device_acls(alice_lamp)
    denies = [a for a in acls if not a["allow"]]
    assert {(a["acltype"], a["topic"]) for a in denies} == {
        ("publishClientSend", "#"),
        ("publishClientReceive", "#"),
        ("subscribePattern", "#"),
    }
    assert max(a["priority"] for a in denies) < min(a["priority"] for a in acls if a["allow"])


@pytest.mark.parametrize("topic", sorted(broker.RESERVED_TASMOTA_TOPICS))
def test_a_tasmota_topic_that_would_reach_other_devices_gets_no_login(alice_owner, topic):
    device = Device.objects.create(
        owner=alice_owner, device_id=f"plug-{topic}", profile=Profile.TASMOTA, topic=topic
    )
    with pytest.raises(CredentialRefused, match="would reach other devices' topics"):
        issue_credential(device)
    assert not DeviceCredential.objects.exists()


def test_the_platforms_own_broker_logins_are_not_device_names(alice_owner, settings):
    settings.MQTT_URL = "mqtt://platform:secret@127.0.0.1:1883"
    for name in ("dynsec-admin", "platform"):
        device = Device.objects.create(owner=alice_owner, device_id=name, profile=Profile.METER_V2)
        with pytest.raises(CredentialRefused, match="the platform itself"):
            issue_credential(device)
    assert not DeviceCredential.objects.exists()


def test_without_a_broker_admin_logins_are_kept_in_the_database_only(
    alice_lamp, settings, django_capture_on_commit_callbacks
):
    settings.MQTT_ADMIN_PASSWORD = ""
    with django_capture_on_commit_callbacks(execute=True):
        outcome = issue_credential(alice_lamp)
        assert outcome.broker == "pending"  # the broker is only told after the commit
    assert outcome.broker == "skipped"
    assert "set MQTT_ADMIN_PASSWORD" in outcome.error
    assert DeviceCredential.objects.get(device=alice_lamp).username == "alice-lamp-1"


def test_an_admin_url_carrying_a_login_is_refused(settings):
    settings.MQTT_ADMIN_PASSWORD = "x"
    settings.MQTT_ADMIN_URL = "mqtt://dynsec-admin:pw@mosquitto:1883"
    with pytest.raises(BrokerNotConfigured, match="must not contain a login"):
        DynsecAdmin.from_settings()
    settings.MQTT_ADMIN_URL = "http://mosquitto"
    with pytest.raises(BrokerNotConfigured, match="mqtt://"):
        DynsecAdmin.from_settings()


def test_steps_states_and_outcomes_never_show_the_password(alice_lamp):
    password = new_password()
    desired = broker.desired_state(alice_lamp, "alice-lamp-1", "u-1", Secret(password))
    step = Step("created client alice-lamp-1", {"command": "createClient", "password": password})
    outcome = Outcome("alice-lamp-1", "credential issued", "applied", [step.text])
    for shown in (repr(desired), desired.description, repr(step), str(outcome), repr(outcome)):
        assert password not in shown


def test_the_password_digest_follows_the_password_and_the_credential():
    assert broker.password_hmac("u-1", "a") == broker.password_hmac("u-1", "a")
    assert broker.password_hmac("u-1", "a") != broker.password_hmac("u-1", "b")
    assert broker.password_hmac("u-1", "a") != broker.password_hmac("u-2", "a")


def test_generated_passwords_are_long_random_and_url_safe():
    passwords = {new_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) == 32 and p.replace("-", "").replace("_", "").isalnum() for p in passwords)


def test_rotation_needs_a_credential_and_a_usable_password(alice_lamp, settings):
    settings.MQTT_ADMIN_PASSWORD = ""
    with pytest.raises(CredentialRefused, match="no credential to rotate"):
        rotate_credential(alice_lamp)
    issue_credential(alice_lamp)
    for bad in ("", "a\x00b", "x" * 4097):
        with pytest.raises(CredentialRefused, match="1-4096 characters"):
            rotate_credential(alice_lamp, password=bad)
    rotate_credential(alice_lamp, password="chosen by the operator")
    assert DeviceCredential.objects.get(device=alice_lamp).password == "chosen by the operator"


def test_revoking_twice_or_without_a_credential_is_harmless(alice_lamp, settings):
    settings.MQTT_ADMIN_PASSWORD = ""
    assert revoke_credential(alice_lamp).change == "no credential"
    issue_credential(alice_lamp)
    assert revoke_credential(alice_lamp).change == "credential revoked"
    assert revoke_credential(alice_lamp).change == "credential already revoked"
