"""Standard Webhooks signing (https://www.standardwebhooks.com/).

    webhook-id: msg_…              stable across retries and replays: the receiver's idempotency key
    webhook-timestamp: 1614265330  seconds, of this attempt (receivers reject stale ones)
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"> [v1,<…> …]

Secrets are `whsec_` + base64 of the key bytes. During a rotation's grace period a request
carries one signature per valid secret, newest first, so a receiver may switch keys at any time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable

PREFIX = "whsec_"
KEY_BYTES = 24  # Svix and the spec's examples use 24 random bytes


class SecretError(ValueError):
    pass


def generate_secret() -> str:
    return PREFIX + base64.b64encode(os.urandom(KEY_BYTES)).decode()


def decode_secret(secret: str) -> bytes:
    if not secret.startswith(PREFIX):
        raise SecretError("a signing secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except ValueError:
        raise SecretError("a signing secret is whsec_ followed by base64") from None
    if not 16 <= len(key) <= 64:
        raise SecretError("a signing secret holds 16 to 64 bytes")
    return key


def validate_secret(secret: str) -> None:
    decode_secret(secret)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def verify(secret: str, msg_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """A receiver's check: does any `v1` signature in `header` match `secret`?"""
    expected = sign(decode_secret(secret), msg_id, int(timestamp), body).encode()
    return any(
        hmac.compare_digest(candidate.encode(), expected)
        for candidate in header.split()
        if candidate.startswith("v1,")
    )
