"""`manage.py health`: real dependencies (and broken ones), and processes that are not running."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from apps.devices.models import Connection, EventKind, Telemetry
from apps.forwarding.models import Delivery, WebhookDestination
from apps.schedules.models import Schedule
from tests.conftest import free_port, launch_mosquitto, mosquitto_binary

pytestmark = pytest.mark.django_db(databases="__all__")


def health(*args: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("health", *args, "--timeout", "3", stdout=out)
    except SystemExit as exc:
        return int(exc.code), out.getvalue()
    return 0, out.getvalue()


def lines(text: str) -> dict[str, tuple[str, str]]:
    """{check: (LEVEL, detail)} from the command's table."""
    found = {}
    for line in text.splitlines():
        level, name, *rest = line.split(maxsplit=2)
        found[name] = (level, rest[0] if rest else "")
    return found


@pytest.fixture
def broker_url(settings, mqtt_broker) -> str:
    settings.MQTT_URL = mqtt_broker.url
    settings.MQTT_PROTOCOL = mqtt_broker.protocol
    return mqtt_broker.url


@pytest.fixture
def refusing_mosquitto(tmp_path) -> Iterator[str]:
    """A Mosquitto that refuses every login (no anonymous access, no password file)."""
    binary = mosquitto_binary("a broker that refuses logins")
    port = free_port()
    proc = launch_mosquitto(
        binary, tmp_path, f"listener {port} 127.0.0.1\nallow_anonymous false\n", port
    )
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def due_delivery(hook: WebhookDestination, waited: timedelta) -> Delivery:
    return Delivery.objects.create(
        owner=hook.owner,
        destination=hook,
        event_id="tel_1",
        event_type="telemetry",
        device="alice-meter-1",
        message_id="msg_1",
        payload={},
        next_attempt_at=timezone.now() - waited,
    )


def test_every_dependency_answers_and_every_process_keeps_up(broker_url):
    code, text = health()

    found = lines(text)
    assert code == 0, text
    for name in ("database", "channel_layer", "celery_broker", "mqtt_broker", "migrations"):
        assert found[name][0] == "OK", text
    assert found["migrations"][1] == "all applied"
    for name in ("listener", "workers", "beat"):
        assert found[name][0] == "OK", text


def test_an_unreachable_broker_fails_the_command(settings, broker_url):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        settings.MQTT_URL = f"mqtt://127.0.0.1:{closed.getsockname()[1]}"

    code, text = health()

    assert code == 1
    level, detail = lines(text)["mqtt_broker"]
    assert level == "FAIL"
    assert "ConnectionRefusedError" in detail
    assert lines(text)["database"][0] == "OK"  # the others are still checked


def test_a_broker_refusing_the_login_fails_and_the_password_is_never_shown(
    settings, refusing_mosquitto
):
    settings.MQTT_PROTOCOL = "5"
    settings.MQTT_URL = refusing_mosquitto.replace("mqtt://", "mqtt://listener:s3cret-pw@")

    code, text = health()

    assert code == 1
    level, detail = lines(text)["mqtt_broker"]
    assert level == "FAIL"
    assert "refused" in detail
    assert "s3cret-pw" not in text


def test_a_url_with_a_password_is_shown_masked(settings, broker_url):
    # The machine's broker admits anonymous clients, so the login is accepted whatever it is.
    settings.MQTT_URL = broker_url.replace("mqtt://", "mqtt://listener:s3cret-pw@")
    code, text = health()
    assert code == 0, text
    assert lines(text)["mqtt_broker"][1].startswith("mqtt://listener:***@")
    assert "s3cret-pw" not in text


def test_processes_not_doing_their_job_are_warnings_and_strict_makes_them_fail(
    broker_url, alice_owner, alice_meter
):
    now = timezone.now()
    # The listener: a device online, nothing received for 20 minutes.
    alice_meter.connection = Connection.ONLINE
    alice_meter.save()
    Telemetry.objects.create(
        owner=alice_owner,
        device=alice_meter,
        kind=EventKind.TELEMETRY,
        ts=now - timedelta(minutes=20),
        received_at=now - timedelta(minutes=20),
        topic="iot/alice-meter-1/telemetry",
        data={},
    )
    # The workers: a delivery due for 5 minutes.
    hook = WebhookDestination.objects.create(
        owner=alice_owner, name="crm", url="https://example.com/hook"
    )
    due_delivery(hook, timedelta(minutes=5))
    # Beat: a schedule due for 3 minutes.
    Schedule.objects.create(
        owner=alice_owner,
        name="evening",
        device=alice_meter,
        action="ON",
        cron="0 18 * * *",
        timezone="UTC",
        next_run_at=now - timedelta(minutes=3),
    )

    code, text = health()

    found = lines(text)
    assert code == 0, text  # warnings alone do not fail
    assert found["listener"][0] == "WARN" and "mqtt_listen" in found["listener"][1]
    assert found["workers"][0] == "WARN" and "worker" in found["workers"][1]
    assert found["beat"][0] == "WARN" and "beat" in found["beat"][1]

    code, _ = health("--strict")
    assert code == 1


def test_a_due_delivery_of_a_disabled_destination_is_no_sign_of_a_missing_worker(
    broker_url, alice_owner
):
    hook = WebhookDestination.objects.create(
        owner=alice_owner, name="paused", url="https://example.com/hook", enabled=False
    )
    due_delivery(hook, timedelta(hours=1))
    _, text = health()
    assert lines(text)["workers"][0] == "OK"


def test_json_output_for_monitoring_scripts(settings, broker_url):
    out = StringIO()
    call_command("health", "--json", stdout=out)
    body = json.loads(out.getvalue())
    assert body["status"] in {"ok", "warn"}
    assert body["checks"]["mqtt_broker"]["level"] == "ok"
    assert body["checks"]["database"]["ms"] >= 0

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        settings.MQTT_URL = f"mqtt://127.0.0.1:{closed.getsockname()[1]}"
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("health", "--json", stdout=out)
    assert json.loads(out.getvalue())["status"] == "fail"
