"""A provisioned device may use its own topics and nothing else, on a real Mosquitto (dynsec).

Denied publishes are silently dropped by Mosquitto, so every "cannot" here is proven with the
spy (which reads everything) and a barrier message published after the denied one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from apps.devices.credentials import issue_credential
from apps.devices.models import Device, DeviceCredential, Profile
from apps.owners.models import Owner
from tests.devices.broker_kit import DynsecBroker, Peer, unique

pytestmark = pytest.mark.django_db


@dataclass
class Contract:
    """A device's topics by profile: what it publishes, where its commands come from."""

    publishes: list[str]
    commands: list[str]
    command_filters: list[str]  # what its firmware subscribes to


def contract(device: Device) -> Contract:
    i, t = device.device_id, device.topic
    if device.profile == Profile.ESP32_LAMP:
        return Contract([f"home/{i}/status", f"home/{i}/lwt"], [f"home/{i}/cmd"], [f"home/{i}/cmd"])
    if device.profile == Profile.TASMOTA:
        return Contract(
            [f"stat/{t}/POWER", f"tele/{t}/STATE", f"{t}/stat/RESULT", f"{t}/tele/SENSOR"],
            [f"cmnd/{t}/POWER", f"{t}/cmnd/POWER2"],
            [f"cmnd/{t}/#", f"{t}/cmnd/#"],
        )
    channels = ("telemetry", "hello", "status", "command/ack", "ota/status")
    return Contract([f"iot/{i}/{c}" for c in channels], [f"iot/{i}/command"], [f"iot/{i}/command"])


def make_device(owner: Owner, profile: str) -> Device:
    device_id = unique(profile.split("-")[0])
    topic = unique("Tasmota_A1") if profile == Profile.TASMOTA else ""
    return Device.objects.create(owner=owner, device_id=device_id, profile=profile, topic=topic)


@pytest.fixture
def provisioned(committed: Callable[..., Any]) -> Callable[[Owner, str], Device]:
    """Makes a device with a login in the broker."""

    def make(owner: Owner, profile: str) -> Device:
        device = make_device(owner, profile)
        outcome = committed(issue_credential, device)
        assert outcome.broker == "applied", outcome
        return device

    return make


def login(peers: Callable[..., Peer], broker: DynsecBroker, device: Device) -> Peer:
    credential = DeviceCredential.objects.get(device=device)
    peer = peers(broker, credential.username, credential.password.reveal())
    assert not peer.connect().is_failure, peer.connack
    return peer


PROFILES = [Profile.ESP32_LAMP, Profile.TASMOTA, Profile.METER_V2]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_provisioned_device_publishes_its_topics_and_receives_its_commands(
    profile, alice_owner, broker_settings, spy, peers, provisioned
):
    device = provisioned(alice_owner, profile)
    mine = contract(device)
    peer = login(peers, broker_settings, device)
    for topic_filter in mine.command_filters:
        assert not peer.subscribe(topic_filter)[0].is_failure, topic_filter

    for topic in mine.publishes:
        peer.publish(topic, b"report")
    assert spy.wait(lambda: all(spy.received(t) == [b"report"] for t in mine.publishes))
    for topic in mine.commands:
        spy.publish(topic, b"ON")
    assert peer.wait(lambda: all(peer.received(t) == [b"ON"] for t in mine.commands))


@pytest.mark.parametrize("profile", PROFILES)
def test_it_cannot_publish_on_other_devices_topics(
    profile, alice_owner, charlie_owner, broker_settings, spy, peers, provisioned
):
    device = provisioned(alice_owner, profile)
    others = [provisioned(charlie_owner, p) for p in PROFILES] + [provisioned(alice_owner, profile)]
    peer = login(peers, broker_settings, device)
    # A connected victim listening for its commands must not get forged ones either.
    victim = others[PROFILES.index(profile)]
    victim_peer = login(peers, broker_settings, victim)
    for topic_filter in contract(victim).command_filters:
        victim_peer.subscribe(topic_filter)

    forged = ["foreign/topic", "home/x", "cmnd/tasmotas/POWER"]  # incl. Tasmota's group topic
    for other in others:
        forged += contract(other).publishes + contract(other).commands
    forged += contract(device).commands  # not even its own command topic
    for topic in forged:
        peer.publish(topic, b"forged")
    # And no way into the broker's administration: a device cannot create clients.
    evil = unique("evil")
    peer.publish(
        "$CONTROL/dynamic-security/v1",
        json.dumps({"commands": [{"command": "createClient", "username": evil, "password": "x"}]}),
    )
    peer.barrier(spy, contract(device).publishes[0])

    assert [(t, p) for t, p in spy.messages if p == b"forged"] == []
    assert not victim_peer.received(contract(victim).commands[0])
    with broker_settings.admin() as admin:
        assert admin.get({"command": "getClient", "username": evil}, "Client not found") is None


@pytest.mark.parametrize("profile", PROFILES)
def test_it_cannot_subscribe_to_other_devices_commands_or_wildcards(
    profile, alice_owner, broker_settings, spy, peers, provisioned
):
    device = provisioned(alice_owner, profile)
    other = provisioned(alice_owner, profile)
    peer = login(peers, broker_settings, device)
    own = contract(device)
    for topic_filter in own.command_filters:
        peer.subscribe(topic_filter)

    refused = [*contract(other).command_filters, "#", "home/+/cmd", "cmnd/+/#", "+/cmnd/#"]
    refused += ["iot/+/command", "$SYS/#", "$CONTROL/dynamic-security/#"]
    refused += contract(other).publishes[:1]  # nor read another device's reports
    for topic_filter in refused:
        assert peer.subscribe(topic_filter)[0].is_failure, topic_filter

    for topic in contract(other).commands + contract(other).publishes:
        spy.publish(topic, b"not for you")
    spy.barrier(peer, own.commands[0])
    assert [(t, p) for t, p in peer.messages if p == b"not for you"] == []


def test_a_wrong_password_or_an_unknown_user_is_refused(
    alice_owner, broker_settings, peers, provisioned
):
    device = provisioned(alice_owner, Profile.ESP32_LAMP)
    password = DeviceCredential.objects.get(device=device).password.reveal()

    assert peers(broker_settings, device.device_id, password + "x").connect().is_failure
    assert peers(broker_settings, device.device_id, "").connect().is_failure
    assert peers(broker_settings, unique("nobody"), password).connect().is_failure
    assert not peers(broker_settings, device.device_id, password).connect().is_failure
