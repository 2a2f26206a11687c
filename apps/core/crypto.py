"""Secrets at rest: AES-256-GCM under named keys from settings.FIELD_ENCRYPTION_KEYS.

A ciphertext is the text `v1:<key-id>:<urlsafe-b64(nonce || ciphertext+tag)>`. The caller supplies
associated data naming where the value lives (model, field, owner, row), so a ciphertext copied
into another row fails authentication instead of decrypting there (Fernet cannot do this).

Keys are `"<key-id>:<urlsafe-b64 of 32 bytes>"`, newest first: the first encrypts, all decrypt.
They are independent of SECRET_KEY. Nothing in this module logs, and no exception message carries
key material, plaintext or ciphertext.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

VERSION = "v1"
NONCE_BYTES = 12  # 96 bits: the size GCM is specified for; random per encryption.
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MASK = "********"


class DecryptionError(Exception):
    """A stored secret could not be decrypted: unknown key id, wrong key, tampering or a value
    moved from another row. Never carries the value itself."""


def generate_key() -> str:
    """A new key in the FIELD_ENCRYPTION_KEYS format: "<key id>:<base64 of 32 random bytes>"."""
    return f"k{secrets.token_hex(4)}:{base64.urlsafe_b64encode(os.urandom(32)).decode()}"


class Secret:
    """A decrypted value that does not show itself: `str`, `repr` and f-strings print a mask, and it
    cannot be pickled (so it never ends up in a cache or a task message). `reveal()` gives the text.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret wraps text, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            other = other._value
        if not isinstance(other, str):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other.encode())

    __hash__ = None  # type: ignore[assignment]  # equal to str but must not be a dict key

    def __copy__(self) -> Secret:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values cannot be pickled; pass ids and decrypt where needed")


class Ciphertext(str):
    """Text known to be a stored ciphertext (as read from the database or made by `encrypt`).

    The encrypted field stores only values of this type, which is how it refuses plaintext that
    would reach the database without going through `pre_save` (`QuerySet.update`, `bulk_update`).
    """

    __slots__ = ()

    @property
    def key_id(self) -> str:
        return key_id_of(self)

    def __repr__(self) -> str:
        return f"<Ciphertext {self[:48]}…>" if len(self) > 48 else f"<Ciphertext {str(self)}>"


@dataclass(frozen=True)
class Keyring:
    primary_id: str
    keys: dict[str, AESGCM]


def parse_keys(entries: object) -> Keyring:
    """Validate FIELD_ENCRYPTION_KEYS. Errors name the position and key id, never the key."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise ImproperlyConfigured(
            "FIELD_ENCRYPTION_KEYS must be a list of '<key-id>:<base64 key>' strings, newest first"
        )
    if not entries:
        raise ImproperlyConfigured(
            "FIELD_ENCRYPTION_KEYS is empty; generate one with "
            "`python -c 'from apps.core.crypto import generate_key; print(generate_key())'`"
        )
    keys: dict[str, AESGCM] = {}
    for index, entry in enumerate(entries):
        where = f"FIELD_ENCRYPTION_KEYS[{index}]"
        if not isinstance(entry, str) or ":" not in entry:
            raise ImproperlyConfigured(f"{where} is not of the form '<key-id>:<base64 key>'")
        key_id, _, material = entry.strip().partition(":")
        if not KEY_ID_RE.match(key_id):
            raise ImproperlyConfigured(
                f"{where}: the key id must be 1-64 letters, digits, '_', '-' or '.'"
            )
        if key_id in keys:
            raise ImproperlyConfigured(f"{where}: key id {key_id!r} appears twice")
        try:
            raw = base64.b64decode(material, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ImproperlyConfigured(f"{where} (key id {key_id!r}): key is not urlsafe base64")
        if len(raw) != KEY_BYTES:
            raise ImproperlyConfigured(
                f"{where} (key id {key_id!r}): key must be {KEY_BYTES} bytes, got {len(raw)}"
            )
        keys[key_id] = AESGCM(raw)
    return Keyring(primary_id=next(iter(keys)), keys=keys)


# Parsed once per distinct setting value. Comparing against the current setting on every call
# (instead of caching forever) makes override_settings and reloaded settings take effect at once.
_cache: tuple[tuple[object, ...], Keyring] | None = None


def keyring() -> Keyring:
    global _cache
    entries = getattr(settings, "FIELD_ENCRYPTION_KEYS", None)
    marker = tuple(entries) if isinstance(entries, list | tuple) else (entries,)
    cached = _cache
    if cached is not None and cached[0] == marker:
        return cached[1]
    ring = parse_keys(entries)
    _cache = (marker, ring)
    return ring


def current_key_id() -> str:
    return keyring().primary_id


def encrypt(plaintext: str, associated_data: bytes) -> Ciphertext:
    """Encrypt under the newest key with a fresh random nonce."""
    if not isinstance(plaintext, str):
        raise TypeError(f"encrypt() takes text, not {type(plaintext).__name__}")
    ring = keyring()
    nonce = os.urandom(NONCE_BYTES)
    sealed = ring.keys[ring.primary_id].encrypt(nonce, plaintext.encode(), associated_data)
    payload = base64.urlsafe_b64encode(nonce + sealed).decode()
    return Ciphertext(f"{VERSION}:{ring.primary_id}:{payload}")


def _split(token: str) -> tuple[str, bytes]:
    version, _, rest = token.partition(":")
    key_id, _, payload = rest.partition(":")
    if version != VERSION or not key_id or not payload:
        raise DecryptionError(f"not a {VERSION} ciphertext")
    try:
        raw = base64.b64decode(payload, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("ciphertext is not valid base64") from None
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionError("ciphertext is truncated")
    return key_id, raw


def key_id_of(token: str) -> str:
    """The id of the key a ciphertext was made with (DecryptionError if it is malformed)."""
    return _split(token)[0]


def decrypt(token: str, associated_data: bytes) -> str:
    """Decrypt, or raise DecryptionError. Never returns the ciphertext or an empty string."""
    key_id, raw = _split(token)
    aead = keyring().keys.get(key_id)
    if aead is None:
        raise DecryptionError(
            f"encrypted with key id {key_id!r}, which is not in FIELD_ENCRYPTION_KEYS"
        )
    try:
        plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated_data)
    except InvalidTag:
        # One message for all three causes: GCM cannot tell them apart, by design.
        raise DecryptionError(
            f"authentication failed under key id {key_id!r}: wrong key, tampered ciphertext, "
            "or a value that belongs to another row or owner"
        ) from None
    return plain.decode()


@checks.register(checks.Tags.security)
def check_field_encryption_keys(app_configs: object = None, **kwargs: object) -> list[checks.Error]:
    """Report bad keys at start (runserver, migrate, check), not only at the first secret."""
    try:
        parse_keys(getattr(settings, "FIELD_ENCRYPTION_KEYS", None))
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="core.E010")]
    return []
