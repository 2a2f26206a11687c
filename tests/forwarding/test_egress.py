"""The egress guard refuses hostile destinations at connect time; the allow-list lets the test
receiver through. End-to-end cases send real deliveries and put canary receivers on the
addresses a hostile URL aims at: a canary that hears anything means the guard failed."""

from __future__ import annotations

import logging
import socket

import pytest
from django.core.exceptions import ValidationError

from apps.forwarding import egress
from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.outbox import forget_routes, write_outbox
from apps.forwarding.webhook.models import WebhookDestination

from .conftest import deliver_due, make_event, make_webhook
from .receiver import Answer, Receiver

DENIED = [
    "127.0.0.1",
    "127.0.0.2",
    "0.0.0.0",  # noqa: S104 - an address to refuse, not to bind
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # CGNAT: neither private nor global in Python 3.11
    "192.0.0.8",  # reports is_global=True in Python 3.11.7
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1, is_global=True in Python 3.11.7
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1, is_global=True in Python 3.11.7
    "2001:db8::1",
    "2001::1",  # Teredo
    "fc00::1",
    "fe80::1",
    "ff02::1",
]
ALLOWED = ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", DENIED)
def test_it_refuses_special_purpose_addresses(address: str, settings) -> None:
    settings.EGRESS_ALLOW = []
    assert egress.denial_reason(address) is not None
    with pytest.raises(egress.EgressDenied):
        egress.check_address(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_it_allows_public_addresses(address: str, settings) -> None:
    settings.EGRESS_ALLOW = []
    assert egress.denial_reason(address) is None


def test_the_allow_list_takes_cidrs_and_host_names(settings) -> None:
    settings.EGRESS_ALLOW = ["127.0.0.1/32", "receiver.internal"]
    assert egress.denial_reason("127.0.0.1") is None
    assert egress.denial_reason("127.0.0.2") is not None
    assert egress.denial_reason("10.9.9.9", host="receiver.internal") is None
    assert egress.denial_reason("10.9.9.9", host="other.internal") is not None
    # The mapped form of an allowed IPv4 address is still refused: no detours.
    assert egress.denial_reason("::ffff:127.0.0.1") is not None


@pytest.mark.parametrize(
    "url, code",
    [
        ("ftp://example.com/", "scheme"),
        ("http://example.com/", "scheme"),  # plain HTTP only when the operator allows it
        ("https://user:pw@example.com/", "credentials"),
        ("https:///path", "host"),
        ("https://127.0.0.1/", "egress"),
        ("https://2130706433/", "egress"),  # decimal 127.0.0.1
        ("https://0x7f.1/", "egress"),  # hex
        ("https://017700000001/", "egress"),  # octal
        ("https://127.1/", "egress"),
        ("https://[::ffff:127.0.0.1]/", "egress"),
        ("https://169.254.169.254/latest/meta-data/", "egress"),
        ("https://0.0.0.0/", "egress"),
        ("https://localhost/", "egress"),
        ("https://does-not-exist.invalid/", "egress"),
    ],
)
def test_it_refuses_hostile_urls_when_saved(url: str, code: str, settings) -> None:
    settings.EGRESS_ALLOW = []
    settings.WEBHOOK_ALLOW_HTTP = False
    with pytest.raises(ValidationError) as info:
        egress.validate_webhook_url(url)
    assert info.value.code == code
    if code == "egress":
        # One message whatever the cause: the form must not tell what lies behind a name.
        assert info.value.messages == [egress.SAVE_ERROR]


# --- at connect time ------------------------------------------------------------------------


@pytest.fixture
def canaries(settings):
    """Receivers on loopback addresses that are NOT allow-listed. Only 127.0.0.1/32 is."""
    near = Receiver("127.0.0.1")  # a second port on the allowed address: for 0.0.0.0 tricks
    far = Receiver("127.0.0.2")
    settings.EGRESS_ALLOW = ["127.0.0.1/32"]
    settings.WEBHOOK_ALLOW_HTTP = True
    yield near, far
    near.close()
    far.close()


def _send_one(owner, device, url: str) -> Delivery:
    # Saved without the save-time check: the point is what happens when connecting.
    hook = WebhookDestination.objects.create(owner=owner, name=f"hostile {url}", url=url)
    forget_routes()
    write_outbox([make_event(device)])
    deliver_due()
    return Delivery.objects.get(destination=hook)


def _far_forms(port: int) -> list[str]:
    return [
        f"http://127.0.0.2:{port}/",
        f"http://2130706434:{port}/",  # decimal
        f"http://0x7f000002:{port}/",  # hex
        f"http://0x7f.0.0.2:{port}/",
        f"http://0177.0.0.2:{port}/",  # octal
        f"http://017700000002:{port}/",
        f"http://[::ffff:127.0.0.2]:{port}/",  # IPv4-mapped IPv6
        f"http://[::ffff:7f00:2]:{port}/",
    ]


def test_hostile_urls_are_refused_at_connect_time(
    canaries, alice_owner, alice_lamp, caplog
) -> None:
    near, far = canaries
    urls = [
        *_far_forms(far.port),
        f"http://0.0.0.0:{near.port}/",  # 0.0.0.0 reaches the local host on Linux
        f"http://[::ffff:127.0.0.1]:{near.port}/",  # mapped form of the allowed address
        "http://169.254.169.254/latest/meta-data/",
    ]
    caplog.set_level(logging.INFO, logger="apps.forwarding")
    for url in urls:
        delivery = _send_one(alice_owner, alice_lamp, url)
        attempt = Attempt.objects.get(delivery=delivery)
        assert delivery.status == Status.PENDING, url  # a network failure: retried later
        assert attempt.outcome == Outcome.RETRY
        assert attempt.error == egress.GENERIC_ERROR  # the owner learns nothing more
        assert attempt.duration_ms < 2000, url  # refused, not timed out
    assert far.requests == [] and near.requests == []
    assert "refused" in caplog.text  # the detail went to the operators' log


def test_a_name_that_resolves_public_then_private_is_refused(
    canaries, alice_owner, alice_lamp, monkeypatch
) -> None:
    """DNS rebinding: the save-time check sees a public address, the connection a private one."""
    near, far = canaries
    answers = iter(["93.184.216.34", "127.0.0.2"])

    def rebinding_dns(host: str, port: int | None) -> list[tuple]:
        if host != "rebind.example":
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        address = next(answers, "127.0.0.2")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 80))]

    monkeypatch.setattr(egress, "_getaddrinfo", rebinding_dns)
    url = f"http://rebind.example:{far.port}/hook"
    egress.validate_webhook_url(url)  # first answer: public, accepted at save time
    hook = WebhookDestination.objects.create(owner=alice_owner, name="rebinding", url=url)
    forget_routes()
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    delivery = Delivery.objects.get(destination=hook)
    assert delivery.last_error == egress.GENERIC_ERROR
    assert far.requests == []


def test_a_redirect_to_loopback_is_not_followed(canaries, alice_owner, alice_lamp) -> None:
    near, far = canaries
    # The allow-listed receiver answers with a redirect to a canary.
    near.script("/hook", Answer(302, {"Location": far.url("/stolen")}))
    settings_url = near.url("/hook")
    hook = make_webhook(alice_owner, settings_url, name="redirecting")
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    delivery = Delivery.objects.get(destination=hook)
    assert delivery.status == Status.FAILED
    assert delivery.last_status_code == 302
    assert len(near.at("/hook")) == 1
    assert far.requests == []


def test_the_allow_listed_receiver_is_reached(receiver, alice_owner, alice_lamp) -> None:
    hook = make_webhook(alice_owner, receiver.url(), name="allowed")
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert Delivery.objects.get(destination=hook).status == Status.DELIVERED
    assert len(receiver.requests) == 1
