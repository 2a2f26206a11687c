"""`Idempotency-Key` on mutations (POST, PUT, PATCH, DELETE), scoped per API key.

- First use of a key: a row is INSERTed in its own transaction *before* the view runs (state
  `in_flight`); the unique (api_key, key) constraint makes that insert the claim. The view runs
  and its response (status, body, Location) is stored on the row (state `done`).
- Same key, same request (method, path, JSON body compared canonically): the stored status and
  body are replayed with `Idempotent-Replayed: true`; the view does not run again.
- Same key, another request: 422 `idempotency_key_reused`.
- Same key while the first request is still running: 409 `idempotency_key_in_flight`.
- A 5xx is not stored (its effects were rolled back; the client may retry with the same key).
  Validation errors and other 4xx are stored: the same request would get the same answer.
- Rows are kept `API_IDEMPOTENCY_TTL_HOURS` (24 h by default), then deleted by the cleanup task;
  a key older than that counts as new.

Atomic views (the default) run inside one transaction together with the UPDATE that stores the
response, so either both the effects and the stored response commit or neither does. That makes
a claim left `in_flight` by a crashed process safe to take over after `STALE_AFTER`: its effects
were rolled back with it. The completing UPDATE checks the claim token, so a slow request whose
claim was taken over rolls back instead of committing twice. Views that must not hold a
transaction open (Test Connection waits on the network) set `idempotent_atomic = False`; their
stale claims are never taken over (409 until the key expires) — at most once wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import HttpResponse
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.request import Request

from .errors import Conflict, Unprocessable
from .models import IdempotencyRecord, IdempotencyState

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, like other APIs' keys
STALE_AFTER = timedelta(minutes=5)  # longer than any request may run
STORED_HEADERS = ("Location",)


def ttl() -> timedelta:
    return timedelta(hours=float(settings.API_IDEMPOTENCY_TTL_HOURS))


@dataclass
class Claim:
    record: IdempotencyRecord
    token: str


def key_of(request: Request) -> str | None:
    """The request's Idempotency-Key, if it is a mutation that carries one (400 if malformed)."""
    if request.method not in MUTATIONS:
        return None
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not KEY_RE.fullmatch(key):
        raise exceptions.ValidationError(
            {HEADER: ["Use 1 to 255 visible ASCII characters, e.g. a UUID."]}
        )
    return key


def fingerprint(request: Request) -> str:
    """What makes two requests "the same": method, path with query, and body."""
    raw = request._request.body  # read before DRF parses the stream; Django keeps a copy
    body = raw
    if raw and "json" in (request.content_type or ""):
        # Invalid JSON is compared as bytes (and rejected by the view anyway).
        with contextlib.suppress(ValueError):
            body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.get_full_path().encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def begin(
    request: Request, key: str, *, owner_id: int, api_key_id: int, atomic: bool
) -> Claim | HttpResponse:
    """Claim `key` for this request, or answer from an earlier use of it."""
    fp = fingerprint(request)
    for _attempt in range(3):
        now = timezone.now()
        token = uuid.uuid4().hex
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(
                    owner_id=owner_id,
                    api_key_id=api_key_id,
                    key=key,
                    fingerprint=fp,
                    method=request.method,
                    path=request.get_full_path()[:500],
                    state=IdempotencyState.IN_FLIGHT,
                    claim=token,
                    claimed_at=now,
                    created_at=now,
                )
            return Claim(record, token)
        except IntegrityError:
            pass
        existing = IdempotencyRecord.objects.filter(api_key_id=api_key_id, key=key).first()
        if existing is None:
            continue  # deleted meanwhile (expired): try to claim again
        if existing.created_at < now - ttl():
            IdempotencyRecord.objects.filter(pk=existing.pk, claim=existing.claim).delete()
            continue
        if existing.fingerprint != fp:
            raise Unprocessable(
                "This Idempotency-Key was already used with a different request.",
                code="idempotency_key_reused",
            )
        if existing.state == IdempotencyState.DONE:
            return replay(existing)
        if atomic and existing.claimed_at < now - STALE_AFTER:
            taken = IdempotencyRecord.objects.filter(
                pk=existing.pk, state=IdempotencyState.IN_FLIGHT, claim=existing.claim
            ).update(claim=token, claimed_at=now)
            if taken:
                existing.claim = token
                return Claim(existing, token)
        break
    raise InFlight()


class InFlight(Conflict):
    default_detail = "A request with this Idempotency-Key is still in progress; retry later."
    default_code = "idempotency_key_in_flight"

    def __init__(self) -> None:
        super().__init__()
        self.wait = 1  # Retry-After


def replay(record: IdempotencyRecord) -> HttpResponse:
    response = HttpResponse(
        record.body, status=record.status_code, content_type=record.content_type or None
    )
    for name, value in (record.headers or {}).items():
        response[name] = value
    response[REPLAY_HEADER] = "true"
    return response


def finish(claim: Claim, response: HttpResponse) -> bool:
    """Store the response on the claimed row; False when the claim was taken over."""
    content = getattr(response, "content", b"")
    return bool(
        IdempotencyRecord.objects.filter(
            pk=claim.record.pk, claim=claim.token, state=IdempotencyState.IN_FLIGHT
        ).update(
            state=IdempotencyState.DONE,
            status_code=response.status_code,
            content_type=response.get("Content-Type", ""),
            body=content.decode("utf-8", errors="replace"),
            headers={h: response[h] for h in STORED_HEADERS if response.has_header(h)},
        )
    )


def abandon(claim: Claim) -> None:
    """Forget the claim (after a 5xx): the client may try again with the same key."""
    IdempotencyRecord.objects.filter(pk=claim.record.pk, claim=claim.token).delete()


class _Rollback(Exception):
    def __init__(self, response: HttpResponse) -> None:
        self.response = response


def run(claim: Claim, execute: Any, *, atomic: bool) -> HttpResponse:
    """Run the view (`execute()` returns a rendered response) under `claim`."""
    if not atomic:
        response = execute()
        if response.status_code >= 500:
            abandon(claim)
        else:
            finish(claim, response)
        return response
    try:
        with transaction.atomic():
            response = execute()
            if response.status_code >= 400:
                raise _Rollback(response)  # an error leaves nothing half-done behind
            if not finish(claim, response):
                raise _Rollback(execute_conflict(InFlight()))
            return response
    except _Rollback as rollback:
        response = rollback.response
    if response.status_code >= 500:
        abandon(claim)
    else:
        finish(claim, response)
    return response


def execute_conflict(exc: exceptions.APIException) -> HttpResponse:
    from .errors import error_body

    response = HttpResponse(
        json.dumps(error_body(exc.status_code, exc.default_code, str(exc.detail))),
        status=exc.status_code,
        content_type="application/json",
    )
    return response
