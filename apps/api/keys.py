"""The API token format: `iotp_<43 random base62 characters>_<6 characters of CRC32>`.

- 43 characters of base62 carry 256 bits of randomness (43 × log2 62 ≈ 256.03).
- The `iotp_` prefix lets people, log scrubbers and secret scanners recognise a leaked token.
- The checksum lets the API reject a mistyped or truncated token, and scanners tell a real token
  from random text, without a database lookup.

Only `digest(token)` is stored. A plain SHA-256 is enough here, and better than a slow password
hash: slow hashes (PBKDF2, bcrypt, Argon2) exist to make guessing *low-entropy* passwords from a
stolen hash expensive. A 256-bit random token cannot be guessed whatever the hash costs, so the
slowness would buy nothing — while a fast, unsalted digest can be looked up through a unique
index on every request, instead of costing ~100 ms of CPU per API call.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib

PREFIX = "iotp_"
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
RANDOM_LENGTH = 43
CHECKSUM_LENGTH = 6  # 62**6 > 2**32: any CRC32 fits
TOKEN_RE = re.compile(
    rf"{PREFIX}([0-9A-Za-z]{{{RANDOM_LENGTH}}})_([0-9A-Za-z]{{{CHECKSUM_LENGTH}}})"
)
SHOWN_PREFIX_LENGTH = len(PREFIX) + 8


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits)).rjust(width, ALPHABET[0])


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LENGTH))
    return f"{PREFIX}{body}_{checksum(body)}"


def well_formed(token: str) -> bool:
    """Shape and checksum; a token failing this is refused before any database lookup."""
    match = TOKEN_RE.fullmatch(token)  # fullmatch: no trailing newline
    return bool(match) and secrets.compare_digest(checksum(match.group(1)), match.group(2))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def shown_prefix(token: str) -> str:
    return token[:SHOWN_PREFIX_LENGTH]
