"""Secrets at rest. PLACEHOLDER: being implemented (AES-GCM, key ids, rotation)."""

import base64
import os
import secrets


def generate_key() -> str:
    """A new key in the FIELD_ENCRYPTION_KEYS format: "<key id>:<base64 of 32 random bytes>"."""
    return f"k{secrets.token_hex(4)}:{base64.urlsafe_b64encode(os.urandom(32)).decode()}"
