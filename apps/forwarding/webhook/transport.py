"""Sending webhooks: one asyncio loop per worker process, a keep-alive pool per destination.

Why asyncio (aiohttp) and not a thread pool of `requests`: on this machine class aiohttp with a
few dozen connections signs and posts ~7k requests/s, `requests` ~1.2k (FACTS.md); the
acceptance bar is 3,000 signed deliveries/s end to end. Requests run on the worker process's
`pump` loop, which the drain loop drives between its database steps (see `pump.py` for why not
a background thread); the loop and its sessions live across Celery tasks, so connections stay
alive between them.

Per destination: its own ClientSession whose connector is limited to the destination's
in-flight cap, uses the egress guard's resolver and socket factory (the address connected to is
the address checked), sends no cookies, ignores proxy variables, and never follows redirects.
Each request has a total deadline (connect + send + the whole response, so a receiver that
trickles its body byte by byte is cut off too). A hanging receiver therefore ties up at most
`max_in_flight` coroutines of its own destination for `timeout` seconds, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from django.utils import timezone
from yarl import URL

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


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    name: str
    url: str
    host: str
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


class GuardedResolver(AbstractResolver):
    """DNS through the egress guard's seam; drops refused addresses before any connect.

    The socket factory checks again on the address actually connected to (and covers IP
    literals, which aiohttp does not resolve)."""

    def __init__(self, context: str) -> None:
        self.context = context

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(None, egress._getaddrinfo, host, port)
        results: list[ResolveResult] = []
        for fam, _type, proto, _canon, sockaddr in infos:
            reason = egress.denial_reason(sockaddr[0], host)
            if reason is not None:
                log.warning(
                    "egress refused %s host=%s address=%s: %s",
                    self.context,
                    host,
                    sockaddr[0],
                    reason,
                )
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=sockaddr[0],
                    port=sockaddr[1],
                    family=fam,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise egress.EgressDenied(host, "no allowed address")
        return results

    async def close(self) -> None:
        return None


def _new_session(settings: WebhookSettings, context: str) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.max_in_flight,
        resolver=GuardedResolver(context),
        socket_factory=egress.socket_factory(settings.host, context),
        keepalive_timeout=60,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=settings.timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,  # HTTP(S)_PROXY from the environment must not reroute owners' traffic
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    data = b""
    while len(data) < RESPONSE_READ_MAX:
        chunk = await response.content.read(RESPONSE_READ_MAX - len(data))
        if not chunk:
            break
        data += chunk
    return data[: RESPONSE_KEEP * 4].decode("utf-8", "replace")[:RESPONSE_KEEP]


async def _request(
    session: aiohttp.ClientSession, settings: WebhookSettings, msg_id: str, body: bytes
) -> tuple[int, Mapping[str, str], str]:
    timestamp = int(time.time())
    signature = signature_header(settings.signing_keys(datetime.now(UTC)), msg_id, timestamp, body)
    headers = dict(settings.headers)
    headers.update(
        {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
    )
    async with session.request(
        settings.method, settings.url, data=body, headers=headers, allow_redirects=False
    ) as response:
        text = await _excerpt(response)
        return response.status, response.headers, text


class WebhookTransport:
    """The webhook kind's `kinds.Transport`."""

    def __init__(self) -> None:
        self._pump: Pump | None = None
        # Used only inside the pump's loop.
        self._sessions: dict[int, tuple[float, aiohttp.ClientSession]] = {}
        self._retired: set[aiohttp.ClientSession] = set()

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
        settings = WebhookSettings(
            name=destination.name,
            url=destination.url,
            host=URL(destination.url).host or "",
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
        config = self.config(destination, 0)
        # Its own short-lived loop: Test Connection runs in web requests as well as workers.
        return asyncio.run(asyncio.wait_for(self._ping(config), config.settings.timeout + 5))

    def close(self) -> None:
        current = self._pump
        if current is not None and current is pump.pump():
            current.complete(self._close_sessions(), 10)
        self._pump = None

    def _current_pump(self) -> Pump:
        current = pump.pump()
        if current is not self._pump:
            # First use, or a forked child (Celery prefork): sessions belong to the old loop.
            self._pump = current
            self._sessions = {}
            self._retired = set()
        return current

    # --- the loop's side ----------------------------------------------------------------------

    def _session(self, config: TargetConfig) -> aiohttp.ClientSession:
        entry = self._sessions.get(config.destination_id)
        if entry is not None and entry[0] == config.version:
            return entry[1]
        if entry is not None:
            # Edited: new pool; the old one closes once its requests have had their deadline.
            old = entry[1]
            self._retired.add(old)
            asyncio.get_running_loop().call_later(MAX_TIMEOUT + 5, self._close_retired, old)
        session = _new_session(config.settings, f"destination={config.destination_id}")
        self._sessions[config.destination_id] = (config.version, session)
        return session

    def _start(
        self, config: TargetConfig, rows: list[Claimed], report: Callable[[Result], None]
    ) -> None:
        session = self._session(config)
        for row in rows:
            self._current_pump().spawn(self._send(session, config, row, report))

    async def _send(
        self,
        session: aiohttp.ClientSession,
        config: TargetConfig,
        row: Claimed,
        report: Callable[[Result], None],
    ) -> None:
        settings: WebhookSettings = config.settings
        started = timezone.now()
        t0 = time.perf_counter()
        outcome, code, error, text, retry_after = Outcome.RETRY, None, "Internal error", "", None
        try:
            if row.owner_id != config.owner_id:  # never another owner's event, whatever happens
                raise PermissionError(f"delivery {row.id} is not of owner {config.owner_id}")
            try:
                body = template.render_body(settings.template, row.payload)
            except template.TemplateError as exc:
                outcome, error = Outcome.FAILED, f"Payload template: {exc}"
            else:
                code, headers, text = await _request(session, settings, row.message_id, body)
                outcome, error = classify(code)
                if code in (429, 503):
                    retry_after = parse_retry_after(headers.get("Retry-After"), started)
        except TimeoutError:
            error = f"No complete answer within {settings.timeout} s"
        except (aiohttp.ClientError, OSError) as exc:
            # Connection refused, reset, DNS, TLS, egress guard: one text for the owner (it must
            # not reveal what is behind an address); the detail is for operators.
            log.info(
                "webhook destination=%s delivery=%s failed: %r", config.destination_id, row.id, exc
            )
            error = egress.GENERIC_ERROR
        except Exception:
            log.exception("webhook destination=%s delivery=%s", config.destination_id, row.id)
        finally:
            # Exactly one report per row, whatever happened: the pipeline counts on it.
            report(
                Result(
                    delivery_id=row.id,
                    destination_id=config.destination_id,
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
            )

    async def _ping(self, config: TargetConfig) -> TestResult:
        settings: WebhookSettings = config.settings
        now = timezone.now()
        body = orjson.dumps(
            {
                "type": "ping",
                "timestamp": now.isoformat(),
                "data": {"destination": settings.name, "message": "Test Connection"},
            }
        )
        t0 = time.perf_counter()
        session = _new_session(settings, f"test destination={config.destination_id}")
        try:
            code, _headers, text = await _request(
                session, settings, "msg_ping_" + secrets.token_urlsafe(12), body
            )
        except TimeoutError:
            return TestResult(False, f"No complete answer within {settings.timeout} s")
        except (aiohttp.ClientError, OSError) as exc:
            log.info("webhook test destination=%s failed: %r", config.destination_id, exc)
            return TestResult(False, egress.GENERIC_ERROR)
        finally:
            await session.close()
        ms = int((time.perf_counter() - t0) * 1000)
        ok = 200 <= code < 300
        if ok:
            message = "The receiver accepted the signed ping"
        elif code == 410:
            message = "The receiver answered 410 Gone"
        else:
            message = classify(code)[1]
        return TestResult(ok, message, code, ms)

    def _close_retired(self, session: aiohttp.ClientSession) -> None:
        if session in self._retired:
            self._retired.discard(session)
            self._current_pump().spawn(session.close())

    async def _close_sessions(self) -> None:
        for session in [*(s for _v, s in self._sessions.values()), *self._retired]:
            await session.close()
        self._sessions.clear()
        self._retired.clear()
