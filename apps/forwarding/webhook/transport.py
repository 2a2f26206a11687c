"""Sending webhooks: libcurl's multi interface (pycurl) on the worker's `pump` loop.

Why libcurl and not aiohttp: the drain loop's CPU per delivery is the platform's throughput
limit, and about two thirds of it was aiohttp's per-request Python work (building the request,
the stream reader, a timer per request). libcurl does the HTTP/1.1 work in C; what is left in
Python per request is a few `setopt`s, the signature, one write and one header callback and the
result (docs/performance.md, "Webhooks": in-process CPU per delivery before/after).

One `CurlMulti` per worker process, driven by the pump's asyncio loop (`pump.py`): libcurl says
which sockets to watch (CURLMOPT_SOCKETFUNCTION: they go into a private epoll set, whose one
descriptor the loop watches) and when to wake it (CURLMOPT_TIMERFUNCTION: a loop timer), and we
call `socket_action`. No thread: the drain loop runs this loop between its database steps, as
before, and results reach `report` on the loop's own thread. Connections stay alive in the
multi's cache between requests and between Celery tasks (HTTP/1.1; at most `max_in_flight`
requests of a destination at once, which the pipeline enforces through `capacity()`).

Safety, per request:
- egress guard when connecting: host names are resolved here through the guard's bounded
  lookups (`egress.lookup`, on the guard's own DNS threads; cached DNS_TTL seconds), refused
  addresses dropped, the allowed ones pinned with CURLOPT_RESOLVE; and CURLOPT_OPENSOCKETFUNCTION
  checks every address libcurl is about to connect to (IP literals and decimal/hex/octal forms
  included) and refuses with CURL_SOCKET_BAD before any packet is sent. The owner sees only
  `egress.GENERIC_ERROR`; the reason goes to the log;
- http/https only, redirects never followed, no proxy from the environment, no cookie engine;
- TLS verified against the system CA store (as Python's default SSL context), SNI from the URL;
- a total deadline of `timeout` seconds from when the batch started: name resolution (a batch
  still waiting for DNS then is retried), then CURLOPT_TIMEOUT_MS for what is left (connect,
  send and the whole response, so a receiver that trickles its body byte by byte is cut off
  too): a hanging receiver or DNS server ties up at most its own destination's `max_in_flight`
  requests for `timeout` seconds, nothing else;
- at most RESPONSE_READ_MAX bytes of a response are read (then the transfer is cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import select
import socket
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
import pycurl
from django.utils import timezone

from .. import egress, pump, template
from ..claims import Claimed, Result
from ..kinds import TargetConfig, TestResult
from ..models import Outcome
from ..pump import Pump
from ..retry import parse_retry_after
from .models import MAX_TIMEOUT, WebhookDestination
from .signing import decode_secret, signature_header

log = logging.getLogger(__name__)

USER_AGENT = "iotplatform-webhooks/1.0"
RESPONSE_READ_MAX = 16 * 1024  # read at most this much of a response (the rest is dropped)
RESPONSE_KEEP = 512  # characters kept in the attempt log
LEASE_MARGIN_DEFAULT = 30.0
CONNECT_TIMEOUT_MAX = 10  # seconds for DNS + TCP + TLS, within the destination's total deadline
DNS_TTL = 10.0  # seconds a resolved (and checked) host name is reused
IDLE_CONNECTIONS = 512  # keep-alive connections a worker process keeps open at most
IDLE_SECONDS = 60  # an idle keep-alive connection older than this is not reused
_VERIFY = ssl.get_default_verify_paths()
_orphans: list[Any] = []  # a forked child's inherited multi: never cleaned up (see _Multi)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    name: str
    url: str
    host: str
    port: int
    method: str
    timeout: int
    max_in_flight: int
    # (key, valid until): the current secret (None) and, during a rotation, the previous one.
    keys: tuple[tuple[bytes, datetime | None], ...]
    headers: tuple[tuple[str, str], ...]
    template: Any

    def __repr__(self) -> str:  # never print keys or header values
        return f"WebhookSettings({self.name!r}, {self.method} {self.url})"

    def signing_keys(self, now: datetime) -> list[bytes]:
        return [key for key, until in self.keys if until is None or until > now]


def classify(status: int) -> tuple[str, str]:
    """SPEC §5: 2xx success; 410 disables; 429/503 and 5xx retry; redirects and other 4xx fail."""
    if 200 <= status < 300:
        return Outcome.DELIVERED, ""
    if status == 410:
        return Outcome.GONE, "The receiver answered 410 Gone; the destination was disabled"
    if status in (429, 503):
        return Outcome.RETRY, "The receiver is busy; retrying as it asked"
    if 500 <= status < 600:
        return Outcome.RETRY, "The receiver failed"
    if 300 <= status < 400:
        return Outcome.FAILED, "Redirects are not followed; update the URL"
    return Outcome.FAILED, "The receiver refused the delivery"


def _excerpt(data: bytes | bytearray) -> str:
    return bytes(data[: RESPONSE_KEEP * 4]).decode("utf-8", "replace")[:RESPONSE_KEEP]


def _retry_after(lines: list[bytes]) -> str | None:
    """Retry-After of the final response (header lines as libcurl hands them over)."""
    value = None
    for line in lines:
        if line.startswith(b"HTTP/"):  # a new response (after a 1xx): start over
            value = None
        elif line[:12].lower() == b"retry-after:":
            value = line[12:].strip().decode("latin-1")
    return value


def _ascii_url(url: str) -> tuple[str, str, int]:
    """(URL in ASCII, host, port): libcurl is built without IDN support and pycurl takes ASCII
    only, so a non-ASCII host becomes IDNA and a non-ASCII path or query UTF-8 %-escapes."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not url.isascii():
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
            parts = parts._replace(netloc=host if parts.port is None else f"{host}:{parts.port}")
        safe = "/%:@!$&'()*+,;=?~"
        parts = parts._replace(
            path=quote(parts.path, safe=safe), query=quote(parts.query, safe=safe), fragment=""
        )
        url = urlunsplit(parts)
    return url, host, port


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int, context: str, timeout: float) -> list[str]:
    """Addresses of `host` the egress guard allows, waiting at most `timeout` seconds for DNS
    (blocking: Test Connection)."""
    try:
        infos = egress.getaddrinfo_within(host, port, timeout)
    except TimeoutError:
        log.info("webhook %s host=%s: no answer from DNS within %g s", context, host, timeout)
        return []
    except (OSError, UnicodeError) as exc:
        log.info("webhook %s host=%s does not resolve: %r", context, host, exc)
        return []
    return _allowed(host, infos, context)


def _allowed(host: str, infos: list[tuple[Any, ...]], context: str) -> list[str]:
    """The addresses of a getaddrinfo answer the egress guard allows (refusals logged)."""
    allowed = []
    for address in dict.fromkeys(info[4][0] for info in infos):
        reason = egress.denial_reason(address, host)
        if reason is None:
            allowed.append(address)
        else:
            log.warning("egress refused %s host=%s address=%s: %s", context, host, address, reason)
    return allowed


def _pin(host: str, port: int, addresses: list[str]) -> list[str]:
    """A CURLOPT_RESOLVE entry: libcurl connects to these addresses, and only these."""
    listed = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
    return [f"{host}:{port}:{listed}"]


class _Slot:
    """One easy handle and the request it carries; reused for request after request (the
    connections themselves live in the multi's cache, not in the handle)."""

    __slots__ = (
        "curl", "body", "headers", "overflow", "host", "context", "prepared", "pinned",
        "timeout_ms", "row", "target", "report", "started", "t0",
    )  # fmt: skip

    def __init__(self) -> None:
        self.body = bytearray()
        self.headers: list[bytes] = []
        self.overflow = False
        self.host = ""
        self.context = ""
        self.prepared: _Target | None = None  # what URL, method, deadlines are set for
        self.pinned: list[str] | None = None  # the CURLOPT_RESOLVE entry set
        self.timeout_ms = 0  # the CURLOPT_TIMEOUT_MS set
        self.row: Claimed | None = None
        self.target: _Target | None = None
        self.report: Callable[[Result], None] | None = None
        self.started: datetime | None = None
        self.t0 = 0.0
        c = self.curl = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.PROXY, "")  # HTTP(S)_PROXY must not reroute owners' traffic
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.SSL_VERIFYPEER, 1)
        c.setopt(pycurl.SSL_VERIFYHOST, 2)
        if _VERIFY.cafile:
            c.setopt(pycurl.CAINFO, _VERIFY.cafile)
        if _VERIFY.capath:
            c.setopt(pycurl.CAPATH, _VERIFY.capath)
        c.setopt(pycurl.USERAGENT, USER_AGENT)
        c.setopt(pycurl.MAXAGE_CONN, IDLE_SECONDS)
        c.setopt(pycurl.OPENSOCKETFUNCTION, self._opensocket)
        c.setopt(pycurl.WRITEFUNCTION, self._write)
        c.setopt(pycurl.HEADERFUNCTION, self.headers.append)

    def prepare(
        self, target: _Target, body: bytes, headers: list[bytes | str], timeout_ms: int
    ) -> None:
        """Set up the next request; `timeout_ms` is what is left of its total deadline (less
        than the destination's timeout when the batch waited for DNS)."""
        c = self.curl
        if self.prepared is not target:  # the handle's last request went elsewhere
            c.setopt(pycurl.URL, target.url)
            c.setopt(pycurl.CUSTOMREQUEST, target.method)
            c.setopt(pycurl.CONNECTTIMEOUT_MS, target.connect_ms)
            self.prepared, self.pinned = target, None
            self.host, self.context = target.host, target.context
        if self.pinned is not target.pinned:
            if target.pinned is None:
                c.unsetopt(pycurl.RESOLVE)
            else:
                c.setopt(pycurl.RESOLVE, target.pinned)
            self.pinned = target.pinned
        if self.timeout_ms != timeout_ms:
            c.setopt(pycurl.TIMEOUT_MS, timeout_ms)
            self.timeout_ms = timeout_ms
        c.setopt(pycurl.POSTFIELDS, body)
        c.setopt(pycurl.HTTPHEADER, headers)

    def clear(self) -> None:
        self.body.clear()
        self.headers.clear()
        self.overflow = False
        self.row = self.target = self.report = self.started = None

    def _write(self, data: bytes) -> int | None:
        room = RESPONSE_READ_MAX - len(self.body)
        if len(data) <= room:
            self.body += data
            return None
        self.body += data[:room]
        self.overflow = True
        return 0  # enough read: libcurl ends the transfer (CURLE_WRITE_ERROR, status kept)

    def _opensocket(self, purpose: int, address: Any) -> Any:
        """The connect-time egress check: on the address libcurl is about to connect to."""
        ip = address.addr[0]
        reason = egress.denial_reason(ip, self.host)
        if reason is not None:
            log.warning(
                "egress refused %s host=%s address=%s: %s", self.context, self.host, ip, reason
            )
            return pycurl.SOCKET_BAD
        return socket.socket(address.family, address.socktype, address.protocol)

    def close(self) -> None:
        self.clear()
        self.curl.close()


@dataclass(slots=True)
class _Target:
    """A destination's request settings, computed once per version."""

    destination_id: int
    version: float
    url: str
    host: str
    port: int
    method: str
    timeout: int
    timeout_ms: int
    connect_ms: int
    headers: list[bytes | str]  # the owner's custom headers and the fixed ones
    context: str
    literal: bool
    pinned: list[str] | None = None  # CURLOPT_RESOLVE for a host name, once resolved
    resolved_at: float = 0.0


def _target(config: TargetConfig, context: str) -> _Target:
    settings: WebhookSettings = config.settings
    url, host, port = _ascii_url(settings.url)
    # UTF-8 bytes (pycurl takes only ASCII str); "Name;" is libcurl's spelling of an empty
    # value ("Name:" would remove the header). The platform's own headers win, as before: the
    # model refuses most of their names, and an owner's User-Agent is dropped.
    headers: list[bytes | str] = [
        f"{name}: {value}".encode() if value else f"{name};".encode()
        for name, value in settings.headers
        if name.lower() != "user-agent"
    ]
    # "Expect:" stops libcurl's 100-continue round trip on larger bodies.
    headers += ["Content-Type: application/json", "Expect:"]
    return _Target(
        destination_id=config.destination_id,
        version=config.version,
        url=url,
        host=host,
        port=port,
        method=settings.method,
        timeout=settings.timeout,
        timeout_ms=settings.timeout * 1000,
        connect_ms=min(settings.timeout, CONNECT_TIMEOUT_MAX) * 1000,
        headers=headers,
        context=context,
        literal=_is_ip_literal(host),
    )


@dataclass(slots=True, eq=False)
class _Waiting:
    """A batch waiting for its host name, and the timer of its deadline."""

    target: _Target
    batch: tuple[Any, ...]
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class _Resolving:
    """A host name being resolved for this transport: the guard's lookup (joined once) and the
    batches waiting for it."""

    lookup: egress.Lookup
    waiting: list[_Waiting]


def _signed_headers(
    target: _Target, keys: list[bytes], msg_id: str, timestamp: int, body: bytes
) -> list[bytes | str]:
    return [
        *target.headers,
        f"webhook-id: {msg_id}",
        f"webhook-timestamp: {timestamp}",
        f"webhook-signature: {signature_header(keys, msg_id, timestamp, body)}",
    ]


def _left_ms(target: _Target, t0: float) -> int:
    """What is left of the total deadline of a request (or batch) that started at `t0`
    (perf_counter), in ms; at least 1, since 0 would mean no deadline to libcurl."""
    return max(1, target.timeout_ms - int((time.perf_counter() - t0) * 1000))


def _failure_text(errno: int, target: _Target) -> str:
    if errno == pycurl.E_OPERATION_TIMEDOUT:
        return f"No complete answer within {target.timeout} s"
    # Connection refused, reset, DNS, TLS, egress guard: one text for the owner (it must not
    # reveal what is behind an address); the detail is for operators.
    return egress.GENERIC_ERROR


class _Multi:
    """One CurlMulti driven by an asyncio loop, libcurl's "multi_socket" design.

    libcurl says which sockets to watch (CURLMOPT_SOCKETFUNCTION) and when to wake it up
    (CURLMOPT_TIMERFUNCTION). The sockets go into a private epoll set, and the loop watches only
    that set's descriptor: one epoll_ctl per change instead of asyncio's add_reader/remove_reader
    bookkeeping (which cost more than libcurl's own work per request). The timer is lazy: an
    earlier wake-up than needed is kept (libcurl moves its deadline on every finished transfer),
    and after each wake-up the next one comes from curl_multi_timeout.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, done: Callable[[_Slot, int, str], None]):
        self.pid = os.getpid()
        self.loop = loop
        self.done = done
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self.multi.setopt(pycurl.M_MAXCONNECTS, IDLE_CONNECTIONS)
        self.epoll = select.epoll()
        self.watched: dict[int, int] = {}  # fd -> epoll mask
        loop.add_reader(self.epoll.fileno(), self._on_events)
        self.timer: asyncio.TimerHandle | None = None
        self.soon = False  # a socket_action(TIMEOUT) is queued with call_soon
        self.closed = False
        self.free: list[_Slot] = []
        self.busy: dict[pycurl.Curl, _Slot] = {}

    def slot(self) -> _Slot:
        return self.free.pop() if self.free else _Slot()

    def add(self, slot: _Slot) -> None:
        self.busy[slot.curl] = slot
        self.multi.add_handle(slot.curl)  # libcurl asks for a timer: the transfer starts soon

    # --- libcurl -> us ---------------------------------------------------------------------

    def _on_socket(self, what: int, fd: int, _multi: Any, _socketp: Any) -> None:
        if self.closed:
            return
        if what == pycurl.POLL_REMOVE:
            if self.watched.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)
            return
        mask = (select.EPOLLIN if what & pycurl.POLL_IN else 0) | (
            select.EPOLLOUT if what & pycurl.POLL_OUT else 0
        )
        try:
            if fd in self.watched:
                self.epoll.modify(fd, mask)
            else:
                self.epoll.register(fd, mask)
        except FileNotFoundError:  # closed and reused behind our back: a new socket
            self.epoll.register(fd, mask)
        except FileExistsError:
            self.epoll.modify(fd, mask)
        self.watched[fd] = mask

    def _on_timer(self, ms: int) -> None:
        if ms < 0 or self.closed:
            return  # nothing to wait for; a pending wake-up is harmless
        if ms == 0:
            if not self.soon:
                self.soon = True
                self.loop.call_soon(self._on_timeout)
            return
        when = self.loop.time() + ms / 1000
        if self.timer is None or self.timer.when() > when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(when, self._on_timeout)

    # --- the loop -> libcurl ---------------------------------------------------------------

    def _on_events(self) -> None:
        if self.closed:
            return
        for fd, events in self.epoll.poll(0):
            mask = 0
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                mask |= pycurl.CSELECT_IN
            if events & select.EPOLLOUT:
                mask |= pycurl.CSELECT_OUT
            if events & select.EPOLLERR:
                mask |= pycurl.CSELECT_ERR
            self.multi.socket_action(fd, mask)
        self._collect()

    def _on_timeout(self) -> None:
        if self.closed:
            return
        self.soon = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._collect()
        ms = self.multi.timeout()
        if ms >= 0:
            self._on_timer(ms)

    def _collect(self) -> None:
        while True:
            queued, ok, failed = self.multi.info_read()
            for curl in ok:
                self._finish(curl, 0, "")
            for curl, errno, message in failed:
                self._finish(curl, errno, message)
            if not queued:
                break

    def _finish(self, curl: pycurl.Curl, errno: int, message: str) -> None:
        self.multi.remove_handle(curl)
        slot = self.busy.pop(curl)
        try:
            self.done(slot, errno, message)
        finally:
            slot.clear()
            self.free.append(slot)

    def close(self) -> None:
        if self.pid != os.getpid():
            # A forked child: the sockets are the parent's too, and closing them here could end
            # its TLS sessions. Never clean this copy up.
            _orphans.append(self.multi)
            return
        self.closed = True  # libcurl may still report sockets while it shuts connections down
        if self.timer is not None:
            self.timer.cancel()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.epoll.fileno())
        for curl, slot in list(self.busy.items()):
            self.multi.remove_handle(curl)
            slot.close()
        self.busy.clear()
        for slot in self.free:
            slot.close()
        self.free.clear()
        self.multi.close()
        self.epoll.close()
        self.watched.clear()


class WebhookTransport:
    """The webhook kind's `kinds.Transport`."""

    def __init__(self) -> None:
        self._pump: Pump | None = None
        # Used only inside the pump's loop.
        self._multi: _Multi | None = None
        self._targets: dict[int, _Target] = {}
        # Host names being resolved: (host, port) -> the lookup and the batches waiting for it.
        self._resolving: dict[tuple[str, int], _Resolving] = {}

    # --- the pipeline's side (worker thread) ------------------------------------------------

    def load(self, destination_ids: Collection[int]) -> dict[int, TargetConfig]:
        from django.conf import settings

        margin = getattr(settings, "DELIVERY_LEASE_MARGIN", LEASE_MARGIN_DEFAULT)
        configs = {}
        destinations = WebhookDestination.objects.filter(
            pk__in=destination_ids, enabled=True
        ).prefetch_related("headers")
        for destination in destinations:
            try:
                configs[destination.pk] = self.config(destination, margin)
            except Exception:
                # A secret that no longer decrypts (wrong key) must not stop other owners; the
                # owner sees why nothing is sent, the operator gets the traceback.
                log.exception("destination %s: cannot load its settings", destination.pk)
                WebhookDestination.objects.filter(pk=destination.pk).update(
                    last_error="The destination's settings cannot be read; contact support.",
                    last_error_at=timezone.now(),
                )
        return configs

    def config(self, destination: WebhookDestination, margin: float) -> TargetConfig:
        keys: list[tuple[bytes, datetime | None]] = [
            (decode_secret(destination.secret.reveal()), None)
        ]
        if destination.previous_secret and destination.previous_secret_expires_at:
            keys.append(
                (
                    decode_secret(destination.previous_secret.reveal()),
                    destination.previous_secret_expires_at,
                )
            )
        _url, host, port = _ascii_url(destination.url)
        settings = WebhookSettings(
            name=destination.name,
            url=destination.url,
            host=host,
            port=port,
            method=destination.method,
            timeout=min(destination.timeout, MAX_TIMEOUT),
            max_in_flight=destination.max_in_flight,
            keys=tuple(keys),
            headers=tuple((h.name, h.header_value()) for h in destination.headers.all()),
            template=destination.payload_template,
        )
        return TargetConfig(
            destination_id=destination.pk,
            owner_id=destination.owner_id,
            kind="webhook",
            version=destination.updated_at.timestamp(),
            policy=destination.retry_policy(),
            rate_limit=destination.rate_limit,
            lease_seconds=settings.timeout + margin,
            settings=settings,
        )

    def capacity(self, config: TargetConfig, in_flight: int) -> int:
        return config.settings.max_in_flight - in_flight

    def start(
        self, config: TargetConfig, rows: list[Claimed], report: Callable[[Result], None]
    ) -> None:
        self._current_pump().call(self._start, config, rows, report)

    def test(self, destination: WebhookDestination) -> TestResult:
        """Test Connection: a signed ping on its own easy handle, blocking (web requests and
        workers alike), bounded by the destination's timeout (name resolution included)."""
        config = self.config(destination, 0)
        settings: WebhookSettings = config.settings
        target = _target(config, f"test destination={config.destination_id}")
        now = timezone.now()
        body = orjson.dumps(
            {
                "type": "ping",
                "timestamp": now.isoformat(),
                "data": {"destination": settings.name, "message": "Test Connection"},
            }
        )
        t0 = time.perf_counter()
        if not target.literal:
            addresses = _resolve(target.host, target.port, target.context, target.timeout)
            if not addresses:
                return TestResult(False, egress.GENERIC_ERROR)
            target.pinned = _pin(target.host, target.port, addresses)
        timeout_ms = _left_ms(target, t0)
        msg_id = "msg_ping_" + secrets.token_urlsafe(12)
        keys = settings.signing_keys(datetime.now(UTC))
        slot = _Slot()
        try:
            slot.prepare(
                target,
                body,
                _signed_headers(target, keys, msg_id, int(time.time()), body),
                timeout_ms,
            )
            try:
                slot.curl.perform()
            except pycurl.error as exc:
                errno = exc.args[0]
                if not (errno == pycurl.E_WRITE_ERROR and slot.overflow):
                    log.info("webhook test destination=%s failed: %r", config.destination_id, exc)
                    return TestResult(False, _failure_text(errno, target))
            code = slot.curl.getinfo(pycurl.RESPONSE_CODE)
        finally:
            slot.close()
        ms = int((time.perf_counter() - t0) * 1000)
        ok = 200 <= code < 300
        if ok:
            message = "The receiver accepted the signed ping"
        elif code == 410:
            message = "The receiver answered 410 Gone"
        else:
            message = classify(code)[1]
        return TestResult(ok, message, code, ms)

    def close(self) -> None:
        current = self._pump
        if self._multi is not None and current is not None and current is pump.pump():
            self._multi.close()
        for resolving in self._resolving.values():
            for waiting in resolving.waiting:
                if waiting.timer is not None:
                    waiting.timer.cancel()
            resolving.lookup.release()
        self._multi = None
        self._pump = None
        self._targets = {}
        self._resolving = {}

    def _current_pump(self) -> Pump:
        current = pump.pump()
        if current is not self._pump:
            # First use, or a forked child (Celery prefork): the multi belongs to the old loop.
            if self._multi is not None:
                self._multi.close()  # in a forked child: kept, never cleaned up
            self._pump = current
            self._multi = None
            self._targets = {}
            self._resolving = {}
        return current

    # --- the loop's side ----------------------------------------------------------------------

    def _start(
        self, config: TargetConfig, rows: list[Claimed], report: Callable[[Result], None]
    ) -> None:
        batch = (config, rows, report, timezone.now(), time.perf_counter())
        try:
            target = self._targets.get(config.destination_id)
            if target is None or target.version != config.version:
                target = _target(config, f"destination={config.destination_id}")
                self._targets[config.destination_id] = target
        except Exception:
            log.exception("webhook destination=%s", config.destination_id)
            self._fail(batch, Outcome.RETRY, "Internal error")
            return
        if target.literal or time.monotonic() - target.resolved_at < DNS_TTL:
            self._send(target, batch, target.timeout_ms)
            return
        # A host name: resolved and checked off the loop, on the guard's DNS threads (a slow DNS
        # server must not stall other destinations), once for every batch waiting on the same
        # name; each batch waits only until its own deadline.
        loop = asyncio.get_running_loop()
        key = (target.host, target.port)
        resolving = self._resolving.get(key)
        if resolving is None:
            fresh = self._resolving[key] = _Resolving(egress.lookup(*key), [])
            fresh.lookup.future.add_done_callback(lambda _f: self._wake(loop, key, fresh))
            resolving = fresh
        waiting = _Waiting(target, batch)
        waiting.timer = loop.call_later(
            _left_ms(target, batch[4]) / 1000, self._expired, key, resolving, waiting
        )
        resolving.waiting.append(waiting)

    def _wake(
        self, loop: asyncio.AbstractEventLoop, key: tuple[str, int], resolving: _Resolving
    ) -> None:
        """The lookup ended (on a DNS thread, or at once): continue on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._resolved, key, resolving)

    def _expired(self, key: tuple[str, int], resolving: _Resolving, waiting: _Waiting) -> None:
        """A batch's deadline passed before its host name resolved: its rows are retried."""
        if waiting not in resolving.waiting:
            return
        resolving.waiting.remove(waiting)
        target = waiting.target
        log.info(
            "webhook %s host=%s: no answer from DNS within %s s",
            target.context,
            target.host,
            target.timeout,
        )
        self._fail(waiting.batch, Outcome.RETRY, egress.GENERIC_ERROR)
        if not resolving.waiting and self._resolving.get(key) is resolving:
            # Nobody here waits any more. A lookup still running is joined again by the next
            # batch for this name (the guard keeps it until it ends), not started twice.
            del self._resolving[key]
            resolving.lookup.release()

    def _resolved(self, key: tuple[str, int], resolving: _Resolving) -> None:
        if self._resolving.get(key) is not resolving:
            return  # every batch gave up waiting (or the transport was closed)
        del self._resolving[key]
        resolving.lookup.release()
        future = resolving.lookup.future
        first = resolving.waiting[0].target
        addresses: list[str] = []
        try:
            infos = future.result()
        except (OSError, UnicodeError) as exc:
            log.info("webhook %s host=%s does not resolve: %r", first.context, key[0], exc)
        except Exception:
            log.exception("webhook: resolving %s failed", key)
        else:
            addresses = _allowed(key[0], infos, first.context)
        now = time.monotonic()
        for waiting in resolving.waiting:
            if waiting.timer is not None:
                waiting.timer.cancel()
            target, batch = waiting.target, waiting.batch
            if not addresses:
                self._fail(batch, Outcome.RETRY, egress.GENERIC_ERROR)
                continue
            target.pinned = _pin(target.host, target.port, addresses)
            target.resolved_at = now
            self._send(target, batch, _left_ms(target, batch[4]))

    def _send(self, target: _Target, batch: tuple[Any, ...], timeout_ms: int) -> None:
        config, rows, report, started, t0 = batch
        settings: WebhookSettings = config.settings
        try:
            if self._multi is None:
                self._multi = _Multi(asyncio.get_running_loop(), self._done)
            multi = self._multi
            keys = settings.signing_keys(datetime.now(UTC))
            timestamp = int(time.time())
        except Exception:
            log.exception("webhook destination=%s", config.destination_id)
            self._fail(batch, Outcome.RETRY, "Internal error")
            return
        for row in rows:
            outcome, error = Outcome.RETRY, "Internal error"
            try:
                if row.owner_id != config.owner_id:  # never another owner's event
                    raise PermissionError(f"delivery {row.id} is not of owner {config.owner_id}")
                try:
                    body = template.render_body(settings.template, row.payload)
                except template.TemplateError as exc:
                    outcome, error = Outcome.FAILED, f"Payload template: {exc}"
                else:
                    headers = _signed_headers(target, keys, row.message_id, timestamp, body)
                    slot = multi.slot()
                    slot.prepare(target, body, headers, timeout_ms)
                    slot.row, slot.target, slot.report = row, target, report
                    slot.started, slot.t0 = started, t0
                    multi.add(slot)
                    continue
            except Exception:
                log.exception("webhook destination=%s delivery=%s", config.destination_id, row.id)
            report(self._result(config.destination_id, row, started, t0, outcome, error))

    def _done(self, slot: _Slot, errno: int, message: str) -> None:
        """A transfer ended (libcurl's verdict in `errno`): exactly one report for its row."""
        row, target, report = slot.row, slot.target, slot.report
        assert row is not None and target is not None and report is not None
        assert slot.started is not None
        destination_id = target.destination_id
        code, text, retry_after = None, "", None
        outcome, error = Outcome.RETRY, "Internal error"
        try:
            if errno == 0 or (errno == pycurl.E_WRITE_ERROR and slot.overflow):
                code = slot.curl.getinfo(pycurl.RESPONSE_CODE)
                outcome, error = classify(code)
                text = _excerpt(slot.body)
                if code in (429, 503):
                    retry_after = parse_retry_after(_retry_after(slot.headers), slot.started)
            else:
                log.info(
                    "webhook destination=%s delivery=%s failed: curl error %s: %s",
                    destination_id,
                    row.id,
                    errno,
                    message,
                )
                error = _failure_text(errno, target)
        except Exception:
            log.exception("webhook destination=%s delivery=%s", destination_id, row.id)
        report(
            self._result(
                destination_id, row, slot.started, slot.t0, outcome, error, code, text, retry_after
            )
        )

    @staticmethod
    def _result(
        destination_id: int,
        row: Claimed,
        started: datetime,
        t0: float,
        outcome: str,
        error: str,
        code: int | None = None,
        text: str = "",
        retry_after: float | None = None,
    ) -> Result:
        return Result(
            delivery_id=row.id,
            destination_id=destination_id,
            owner_id=row.owner_id,
            attempt=row.attempt,
            started_at=started,
            duration_ms=int((time.perf_counter() - t0) * 1000),
            outcome=outcome,
            status_code=code,
            error=error,
            response=text,
            retry_after=retry_after,
        )

    def _fail(self, batch: tuple[Any, ...], outcome: str, error: str) -> None:
        config, rows, report, started, t0 = batch
        for row in rows:
            report(self._result(config.destination_id, row, started, t0, outcome, error))
