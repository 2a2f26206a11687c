"""Brute-force protection for password logins (the admin login, and any other password form).

An authentication backend in place of Django's ModelBackend (settings.AUTHENTICATION_BACKENDS):
failed attempts are counted per account (the username as typed, lower-cased and hashed, whether
or not such an account exists — the lock must not tell which names are real) and per client
address, in the same database counters as the API's rate limits (`ratelimit.py`), so the limit
holds across every web process. Once either count reaches its limit within one window
(`LOGIN_LOCKOUT_SECONDS`, aligned), that account or address is locked for a full
`LOGIN_LOCKOUT_SECONDS` from the failure that reached it: further attempts are refused *without
checking the password* — a guess made during the lock learns nothing. The lock is a row of its
own (`ratelimit.lock`), so it does not end early at the count's window boundary.

The refusal is raised as a ValidationError: Django's `authenticate()` lets it through and the
login form shows it as the form's error ("Too many failed logins…"). Successful logins are not
counted. Behind a reverse proxy, run daphne with `--proxy-headers` so REMOTE_ADDR is the
client's address rather than the proxy's.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import ValidationError
from django.http import HttpRequest

from . import ratelimit

_now = time.time  # the tests move the clock here


def _buckets(request: HttpRequest, username: str) -> list[tuple[str, int]]:
    account = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:40]
    address = request.META.get("REMOTE_ADDR") or "unknown"
    return [
        (f"login-account:{account}", int(settings.LOGIN_FAILURES_PER_ACCOUNT)),
        (f"login-address:{address}", int(settings.LOGIN_FAILURES_PER_ADDRESS)),
    ]


class ThrottledModelBackend(ModelBackend):
    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        if request is None or username is None or password is None:
            return super().authenticate(request, username, password, **kwargs)
        seconds = int(settings.LOGIN_LOCKOUT_SECONDS)
        now = _now()
        buckets = _buckets(request, username)
        ends = [ratelimit.locked_until(bucket, now) for bucket, _ in buckets]
        if any(ends):
            minutes = math.ceil((max(e for e in ends if e) - now) / 60)
            raise ValidationError(
                f"Too many failed logins. Try again in {minutes} minute"
                f"{'s' if minutes != 1 else ''}.",
                code="too_many_attempts",
            )
        user = super().authenticate(request, username, password, **kwargs)
        if user is None:
            for bucket, limit in buckets:
                if ratelimit.hit(bucket, limit, seconds, now).count >= limit:
                    ratelimit.lock(bucket, seconds, now)
        return user
