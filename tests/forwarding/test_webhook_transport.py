"""The libcurl transport's own guarantees, beyond the outcome tests: the connect-time egress check
stands on its own, proxies from the environment are ignored, large answers are cut without
losing the status, handles are released on close, and a forked worker gets its own multi."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from apps.forwarding import egress, kinds, pump
from apps.forwarding.claims import Claimed
from apps.forwarding.models import Attempt, Delivery, Outcome, Status
from apps.forwarding.outbox import write_outbox
from apps.forwarding.webhook import transport
from apps.forwarding.webhook.models import WebhookDestination

from .conftest import deliver_due, make_event, make_webhook
from .receiver import Answer, Receiver, signed_by


@pytest.fixture
def canary(settings):
    """A receiver on 127.0.0.2, which is NOT allow-listed (only 127.0.0.1/32 is)."""
    far = Receiver("127.0.0.2")
    settings.EGRESS_ALLOW = ["127.0.0.1/32"]
    settings.WEBHOOK_ALLOW_HTTP = True
    yield far
    far.close()


def test_the_connect_time_check_refuses_what_name_resolution_let_through(
    canary, alice_owner, alice_lamp, monkeypatch, caplog
) -> None:
    """Even if the resolver step were fooled (a race, a bug), libcurl's open-socket hook checks
    the address it is about to connect to and refuses before a packet is sent."""

    def fooled_dns(host: str, port: int | None) -> list[tuple]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port or 80))]

    monkeypatch.setattr(egress, "_getaddrinfo", fooled_dns)
    monkeypatch.setattr(transport, "_allowed", lambda host, infos, context: ["127.0.0.2"])
    url = f"http://fooled.example:{canary.port}/hook"
    hook = WebhookDestination.objects.create(owner=alice_owner, name="fooled", url=url)
    caplog.set_level(logging.INFO, logger="apps.forwarding")
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    delivery = Delivery.objects.get(destination=hook)
    attempt = Attempt.objects.get(delivery=delivery)
    assert attempt.outcome == Outcome.RETRY and attempt.error == egress.GENERIC_ERROR
    assert attempt.duration_ms < 2000  # refused, not timed out
    assert canary.requests == []
    assert "egress refused destination=" in caplog.text and "127.0.0.2" in caplog.text


def test_proxy_variables_do_not_reroute_deliveries(
    receiver, canary, alice_owner, alice_lamp, monkeypatch
) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, canary.url(""))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert Delivery.objects.get(destination=hook).status == Status.DELIVERED
    assert len(receiver.requests) == 1 and canary.requests == []


def test_a_large_answer_is_cut_and_keeps_its_status(receiver, alice_owner, alice_lamp) -> None:
    # Four times what is ever read: the transfer is cut after RESPONSE_READ_MAX bytes.
    receiver.script("/hook", Answer(200, body=b"y" * (4 * transport.RESPONSE_READ_MAX)))
    hook = make_webhook(alice_owner, receiver.url())
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    delivery = Delivery.objects.get(destination=hook)
    attempt = Attempt.objects.get(delivery=delivery)
    assert delivery.status == Status.DELIVERED and attempt.status_code == 200
    assert attempt.response == "y" * transport.RESPONSE_KEEP


def test_retry_after_comes_from_the_final_answer() -> None:
    lines = [
        b"HTTP/1.1 100 Continue\r\n",
        b"Retry-After: 1\r\n",
        b"\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\n",
        b"retry-after:  120 \r\n",
        b"\r\n",
    ]
    assert transport._retry_after(lines) == "120"
    assert transport._retry_after(lines[:3] + lines[3:4]) is None


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_releases_connections_and_a_new_multi_follows(
    receiver, alice_owner, alice_lamp
) -> None:
    web = kinds.transport("webhook")
    web.close()  # start from nothing: no connections of earlier tests
    before = _fds()
    hook = make_webhook(alice_owner, receiver.url(), max_in_flight=4)
    write_outbox([make_event(alice_lamp) for _ in range(8)])
    deliver_due()
    assert web._multi is not None and web._multi.busy == {}
    assert _fds() > before  # keep-alive connections (both ends here) and the epoll set
    web.close()
    assert web._multi is None
    deadline = time.monotonic() + 10
    while _fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the receiver's threads close their ends on EOF
    assert _fds() <= before
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert Delivery.objects.filter(destination=hook, status=Status.DELIVERED).count() == 9


def test_a_forked_child_sends_on_its_own_multi(receiver, alice_owner, alice_lamp) -> None:
    """Celery prefork: the child must not drive (or clean up) the parent's multi."""
    hook = make_webhook(alice_owner, receiver.url("/parent"))
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    web = kinds.transport("webhook")
    parent_multi = web._multi
    assert parent_multi is not None
    config = web.config(WebhookDestination.objects.get(pk=hook.pk), 0)
    child_config = dataclasses.replace(
        config, settings=dataclasses.replace(config.settings, url=receiver.url("/child"))
    )
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no database, only the transport and its pump
        status = 1
        try:
            os.close(read_end)
            row = Claimed(1, alice_owner.pk, hook.pk, "msg_child", "tel_c", "telemetry", {}, 1)
            web.start(child_config, [row], pump.pump().report)
            results = []
            deadline = time.monotonic() + 10
            while not results and time.monotonic() < deadline:
                results = pump.pump().run(0.1)
            fresh = web._multi is not parent_multi
            os.write(write_end, orjson.dumps([r.status_code for r in results] + [fresh]))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = orjson.loads(pipe.read() or b"null")
    _pid, status = os.waitpid(pid, 0)
    assert status == 0 and answer == [200, True]
    [request] = receiver.at("/child")
    assert request.headers["webhook-id"] == "msg_child"
    assert signed_by(request, hook.secret.reveal())
    # The parent's multi is untouched and keeps sending.
    assert web._multi is parent_multi
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert len(receiver.at("/parent")) == 2


def _tls_files(tmp_path) -> tuple[str, str, str]:
    """A private CA, and a certificate it signed for hooks.test: (ca, cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("hooks.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hooks.test")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = [str(tmp_path / n) for n in ("ca.pem", "cert.pem", "key.pem")]
    for path, data in zip(
        paths,
        [
            ca.public_bytes(serialization.Encoding.PEM),
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ],
        strict=True,
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


def test_tls_is_verified_and_the_host_name_is_sent_as_sni(
    receiver, alice_owner, alice_lamp, monkeypatch, tmp_path
) -> None:
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, server_name, _ctx: server_names.append(server_name)
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)

    def loopback_dns(host: str, port: int | None) -> list[tuple]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 443))]

    monkeypatch.setattr(egress, "_getaddrinfo", loopback_dns)
    web = kinds.transport("webhook")
    web.close()  # new easy handles, which trust the private CA only
    monkeypatch.setattr(transport, "_VERIFY", ssl.DefaultVerifyPaths(ca, None, "", "", "", ""))
    try:
        good = make_webhook(alice_owner, f"https://hooks.test:{receiver.port}/hook", name="tls")
        bad = make_webhook(alice_owner, f"https://other.test:{receiver.port}/hook", name="other")
        write_outbox([make_event(alice_lamp)])
        deliver_due()
        assert Delivery.objects.get(destination=good).status == Status.DELIVERED
        [request] = receiver.requests
        assert signed_by(request, good.secret.reveal())
        assert "hooks.test" in server_names
        # A certificate for another name: refused by verification, the owner sees the one text.
        attempt = Attempt.objects.get(delivery__destination=bad)
        assert attempt.outcome == Outcome.RETRY and attempt.error == egress.GENERIC_ERROR
        assert attempt.status_code is None
    finally:
        web.close()  # later tests get handles with the system's CA store again


def test_non_ascii_header_values_and_paths_are_sent(receiver, alice_owner, alice_lamp) -> None:
    from apps.forwarding.webhook.models import WebhookHeader

    hook = make_webhook(alice_owner, receiver.url("/zähler"))
    WebhookHeader.objects.create(destination=hook, name="X-Site", value="Zürich Süd")
    WebhookHeader.objects.create(destination=hook, name="User-Agent", value="owner-agent")
    write_outbox([make_event(alice_lamp)])
    deliver_due()
    assert Delivery.objects.get(destination=hook).status == Status.DELIVERED
    [request] = receiver.requests
    assert request.path == "/z%C3%A4hler"
    # http.server decodes header bytes as latin-1: undo that to compare the UTF-8 sent.
    assert request.headers["x-site"].encode("latin-1").decode() == "Zürich Süd"
    assert request.headers["user-agent"] == transport.USER_AGENT  # the platform's own wins
