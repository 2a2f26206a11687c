"""The egress guard: which addresses the platform may connect to on an owner's behalf.

Owners type URLs and host names; the platform connects from inside the operator's network. Without
a guard, a webhook to `http://169.254.169.254/` or `http://10.0.0.5/` turns the platform into a
proxy into that network (SSRF). Checking the URL when it is saved is not enough: a name can
resolve to a public address at save time and to a private one at send time (DNS rebinding). So the
check that counts runs on the socket address *actually connected to*: the webhook transport asks
`denial_reason()` from libcurl's open-socket callback for each address it is about to connect to,
and the database drivers connect only to addresses `resolve_checked()` passed.

Name resolution itself is bounded: getaddrinfo has no timeout, so lookups run on a few threads
of the guard's own (`lookup()`), and every caller waits only as long as its deadline allows (a
webhook row's total timeout, a database's connect timeout, a few seconds at save time).

Python 3.11's `ipaddress` misses special-purpose ranges (`192.0.0.8`, NAT64 and 6to4 forms of
127.0.0.1 report `is_global=True`, FACTS.md), so the deny list is explicit, and `not is_global`
is checked as well. IPv4-mapped/NAT64/6to4/Teredo IPv6 forms are refused outright: they are how a
private IPv4 address hides inside an IPv6 one, and no real receiver needs them.

The operator's `settings.EGRESS_ALLOW` lets CIDRs (on-premise receivers, the tests' loopback
receiver) or exact host names through. Owners only ever see `GENERIC_ERROR`; the reason goes to
the log, so the guard cannot be used to map the network.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

GENERIC_ERROR = "Could not connect to the destination"
SAVE_ERROR = "This host cannot be reached from the platform."
SAVE_LOOKUP_TIMEOUT = 5.0  # seconds a save waits for DNS before it refuses the host
DNS_THREADS = 8  # lookups running at once per process; more names wait their turn

DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        # IPv4 (RFC 6890 and successors)
        "0.0.0.0/8",  # "this network"; connecting to 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, including cloud metadata 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments (192.0.0.8, DS-Lite, NAT64 discovery…)
        "192.0.2.0/24",  # TEST-NET-1
        "192.31.196.0/24",  # AS112
        "192.52.193.0/24",  # AMT
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "192.175.48.0/24",  # AS112 direct delegation
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
        # IPv6
        "::/128",
        "::1/128",
        "::/96",  # IPv4-compatible (deprecated)
        "::ffff:0:0/96",  # IPv4-mapped
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b::/96",  # NAT64 well-known prefix
        "64:ff9b:1::/48",  # NAT64 local-use
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments: Teredo, ORCHID, benchmarking…
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4
        "3fff::/20",  # documentation (2024)
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)


class EgressDenied(OSError):
    """Raised instead of connecting to a refused address. An OSError, so that the transports
    treat it as the connection failure it is."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(13, f"egress to {address} refused: {reason}")
        self.address = address
        self.reason = reason


@dataclass(frozen=True)
class _AllowList:
    networks: tuple[IPNetwork, ...]
    hosts: frozenset[str]


@lru_cache(maxsize=8)
def _parse_allow(entries: tuple[str, ...]) -> _AllowList:
    networks, hosts = [], set()
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry.lower().rstrip("."))
    return _AllowList(tuple(networks), frozenset(hosts))


def _allow_list() -> _AllowList:
    # Read per call (cached per value) so override_settings in tests takes effect.
    return _parse_allow(tuple(settings.EGRESS_ALLOW))


def denial_reason(address: str | IPAddress, host: str | None = None) -> str | None:
    """Why connecting to `address` (for URL host `host`) is refused, or None when allowed."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    allow = _allow_list()
    if host is not None and host.lower().rstrip(".") in allow.hosts:
        return None
    if any(ip.version == net.version and ip in net for net in allow.networks):
        return None
    for net in DENIED_NETWORKS:
        if ip.version == net.version and ip in net:
            return f"in special-purpose range {net}"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def check_address(address: str, host: str | None = None) -> None:
    reason = denial_reason(address, host)
    if reason is not None:
        raise EgressDenied(address, reason)


def _getaddrinfo(host: str, port: int | None) -> list[tuple[Any, ...]]:
    """DNS resolution. Its own function so that tests can make a name resolve as they need
    (public, then private; slowly; never) without touching the platform's own checks."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


# --- bounded lookups ------------------------------------------------------------------------
#
# getaddrinfo has no timeout of its own: with a DNS server that does not answer, glibc waits
# `timeout x attempts` per name server (tens of seconds), and a thread inside it cannot be
# cancelled. So lookups run on a few threads of their own, and callers bound how long they
# *wait*: a hanging name ties up one of these threads until glibc gives up, never the caller
# beyond its deadline, and never the event loop's default executor (other work waits there).
# A name already being looked up is joined, not looked up again; a lookup still queued when its
# last waiter has given up is dropped, so a flood of hanging names cannot pile up work.


class Lookup:
    """One name being resolved on the DNS threads, shared by everyone asking meanwhile.
    `future` holds getaddrinfo's answer (or its exception); each `lookup()` is paired with one
    `release()` once the caller has its answer or has stopped waiting."""

    __slots__ = ("key", "future", "waiters", "_resolver")

    def __init__(self, key: tuple[str, int | None], resolver: _Resolver) -> None:
        self.key = key
        self.future: Future[list[tuple[Any, ...]]] = Future()
        self.waiters = 0
        self._resolver = resolver

    def release(self) -> None:
        self._resolver.release(self)


class _Resolver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[tuple[str, int | None], Lookup] = {}
        self.queue: queue.SimpleQueue[Lookup] = queue.SimpleQueue()
        self.threads = 0
        self.idle = 0  # threads waiting for a lookup (or about to)
        self.queued = 0  # lookups put on the queue and not yet taken

    def lookup(self, host: str, port: int | None) -> Lookup:
        key = (host, port)
        with self.lock:
            found = self.running.get(key)
            if found is None:
                found = self.running[key] = Lookup(key, self)
                self.queue.put(found)
                self.queued += 1
                if self.queued > self.idle and self.threads < DNS_THREADS:
                    # Daemon threads (not a ThreadPoolExecutor, which joins its threads at
                    # exit): a lookup stuck in getaddrinfo must not hold up a worker's shutdown.
                    self.threads += 1
                    self.idle += 1
                    threading.Thread(target=self._work, name="dns-lookup", daemon=True).start()
            found.waiters += 1
            return found

    def release(self, lookup: Lookup) -> None:
        with self.lock:
            lookup.waiters -= 1
            # cancel() succeeds only while the lookup is still queued: nobody needs it any more.
            if lookup.waiters == 0 and lookup.future.cancel():
                self._forget(lookup)

    def _forget(self, lookup: Lookup) -> None:
        if self.running.get(lookup.key) is lookup:
            del self.running[lookup.key]

    def _work(self) -> None:
        while True:
            lookup = self.queue.get()
            with self.lock:
                self.idle -= 1
                self.queued -= 1
            if lookup.future.set_running_or_notify_cancel():
                host, port = lookup.key
                try:
                    infos = _getaddrinfo(host, port)
                except BaseException as exc:
                    with self.lock:
                        self._forget(lookup)  # forgotten first: the next caller asks again
                    lookup.future.set_exception(exc)
                else:
                    with self.lock:
                        self._forget(lookup)
                    lookup.future.set_result(infos)
            with self.lock:
                self.idle += 1


_resolver_lock = threading.Lock()
_resolver_now: _Resolver | None = None


def _forget_resolver() -> None:
    # A forked child (Celery prefork) has none of the parent's threads: it starts its own.
    global _resolver_lock, _resolver_now
    _resolver_lock = threading.Lock()
    _resolver_now = None


os.register_at_fork(after_in_child=_forget_resolver)


def _resolver() -> _Resolver:
    global _resolver_now
    with _resolver_lock:
        if _resolver_now is None:
            _resolver_now = _Resolver()
        return _resolver_now


def lookup(host: str, port: int | None) -> Lookup:
    """Start resolving `host` on the DNS threads, or join the lookup already under way. Wait on
    `.future` as long as the caller's deadline allows, then `.release()` it."""
    return _resolver().lookup(host, port)


def getaddrinfo_within(host: str, port: int | None, timeout: float) -> list[tuple[Any, ...]]:
    """getaddrinfo waiting at most `timeout` seconds: TimeoutError after that, otherwise
    getaddrinfo's own answer or exception."""
    pending = lookup(host, port)
    try:
        return pending.future.result(timeout)
    finally:
        pending.release()


def resolve_checked(host: str, port: int | None, timeout: float) -> list[str]:
    """Resolve `host` within `timeout` seconds and refuse when any address is denied (used
    before connecting by drivers without a socket hook, and at save time); returns the allowed
    addresses."""
    try:
        infos = getaddrinfo_within(host, port, timeout)
    except TimeoutError:
        raise EgressDenied(host, f"no answer from DNS within {timeout:g} s") from None
    except (OSError, UnicodeError) as exc:
        raise EgressDenied(host, f"does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        check_address(address, host)
    return addresses


# --- URLs -----------------------------------------------------------------------------------


def validate_webhook_url(url: str, resolve: bool = True) -> None:
    """Save-time check of a webhook URL: scheme, no credentials, and (when `resolve`) that the
    host resolves to allowed addresses today. The connect-time check still applies later."""
    parts = urlsplit(url)
    allowed_schemes = ("https", "http") if settings.WEBHOOK_ALLOW_HTTP else ("https",)
    if parts.scheme not in allowed_schemes:
        raise ValidationError("Use an https:// URL.", code="scheme")
    if parts.username or parts.password:
        raise ValidationError(
            "Put credentials in a secret header, not in the URL.", code="credentials"
        )
    if not parts.hostname:
        raise ValidationError("The URL has no host.", code="host")
    try:
        port = parts.port
    except ValueError:
        raise ValidationError("The URL's port is not valid.", code="port") from None
    if resolve:
        try:
            resolve_checked(parts.hostname, port, timeout=SAVE_LOOKUP_TIMEOUT)
        except EgressDenied as exc:
            log.info("webhook URL refused at save time: %s", exc)
            # One text for "does not resolve" and "resolves somewhere refused": no probing.
            raise ValidationError(SAVE_ERROR, code="egress") from None
