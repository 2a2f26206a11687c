"""API keys, idempotency records and rate-limit counters.

Keys and idempotency records belong to an owner (tenant data, scoped like everything else);
rate counters are keyed by bucket name only and hold no tenant data but a count.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from apps.owners.models import Owner


class Scope(models.TextChoices):
    """What a key may do. Routes name the scope they need (docs/api.md has the matrix)."""

    DEVICES_READ = "devices:read", "devices:read — list devices, their state and transitions"
    DEVICES_WRITE = "devices:write", "devices:write — add, change and remove devices"
    TELEMETRY_READ = "telemetry:read", "telemetry:read — query and export telemetry"
    COMMANDS_WRITE = "commands:write", "commands:write — switch devices, read command results"
    SCHEDULES_READ = "schedules:read", "schedules:read — list schedules, runs, next runs"
    SCHEDULES_WRITE = "schedules:write", "schedules:write — add, change and remove schedules"
    DELIVERY_READ = "delivery:read", "delivery:read — destinations, stats, deliveries, attempts"
    DELIVERY_WRITE = "delivery:write", "delivery:write — change destinations, test, replay"


ALL_SCOPES = [scope.value for scope in Scope]


class ApiKey(models.Model):
    """An owner's credential for the API. Only a SHA-256 digest of the token is stored.

    The token itself (`iotp_<43 random>_<crc>`, see `keys.py`) is shown once, at creation.
    """

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=120, help_text="What uses this key, e.g. 'billing sync'.")
    scopes = models.JSONField(default=list, blank=True)
    # The first characters of the token ("iotp_Ab12Cd34"), to recognise a key in lists and logs.
    prefix = models.CharField(max_length=16, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def has_scope(self, scope: str) -> bool:
        return scope in (self.scopes or [])


class IdempotencyState(models.TextChoices):
    IN_FLIGHT = "in_flight", "In flight"
    DONE = "done", "Done"


class IdempotencyRecord(models.Model):
    """One `Idempotency-Key` of one API key: the claim while in flight, then the response.

    The unique (api_key, key) constraint is the claim: of two concurrent requests with the same
    key only the one whose INSERT succeeds runs; the other sees the row (409 while in flight).
    """

    id = models.BigAutoField(primary_key=True)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    # SHA-256 of method, path and (canonical JSON) body: the "same request" test.
    fingerprint = models.CharField(max_length=64)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    state = models.CharField(max_length=10, choices=IdempotencyState.choices)
    # Who holds the claim; the completing UPDATE checks it (a stale claim may be taken over).
    claim = models.CharField(max_length=32)
    claimed_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    content_type = models.CharField(max_length=100, blank=True)
    body = models.TextField(blank=True)
    headers = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "key"], name="unique_idempotency_key"),
        ]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]

    def __str__(self) -> str:
        return f"{self.key} ({self.state})"


class RateCounter(models.Model):
    """Requests counted in one fixed window of one bucket ("key:12", "owner:3", "login-ip:…").

    Incremented with a single `INSERT … ON CONFLICT DO UPDATE … RETURNING` (see ratelimit.py),
    so concurrent requests in any number of processes each get a distinct count.
    """

    id = models.BigAutoField(primary_key=True)
    bucket = models.CharField(max_length=150)
    window_start = models.BigIntegerField(help_text="Unix seconds.")
    expires = models.BigIntegerField(help_text="Window end, Unix seconds: deleted after it.")
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["bucket", "window_start"], name="unique_rate_window"),
        ]
        indexes = [models.Index(fields=["expires"], name="rate_expires")]

    def __str__(self) -> str:
        return f"{self.bucket}@{self.window_start}: {self.count}"
