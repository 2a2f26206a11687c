"""Data Delivery: destinations, the delivery outbox, the attempt log and owner alerts.

`Destination` holds what every kind shares (owner, filters, retry policy, health, figures);
each kind adds its own settings in a child model in its sub-package (`webhook.models`, later
`database.models`) through multi-table inheritance, so that one `Delivery` foreign key, one
claim query and one monitoring page serve every kind. See `kinds.py` for the registry.

`Delivery` rows are the outbox: written in the listener's batch transaction
(`outbox.write_outbox`), claimed atomically by workers (`claims.py`), retried on the schedule held
in `next_attempt_at`, and kept when exhausted (dead letters) for replay.
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import orjson
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from apps.core.indexes import TimeOrderIndex
from apps.devices.events import EVENT_TYPES
from apps.devices.models import Device
from apps.owners.models import Owner

from . import retry

EVENT_TYPE_CHOICES = [(t, t.replace("_", " ")) for t in EVENT_TYPES]


def _limits(name: str) -> list:
    low, high = retry.LIMITS[name]
    return [MinValueValidator(low), MaxValueValidator(high)]


class Destination(models.Model):
    """Where an owner's events go. Never saved on its own: always as a kind's child row."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="destinations")
    kind = models.CharField(max_length=16, editable=False)
    name = models.CharField(max_length=120)
    enabled = models.BooleanField(default=True)

    # --- filters: empty means "all" ---------------------------------------------------------
    event_types = models.JSONField(
        default=list, blank=True, help_text="Leave empty to receive every event type."
    )
    devices = models.ManyToManyField(
        Device, blank=True, related_name="+", help_text="Leave empty to receive every device."
    )

    # --- retry policy and limits ------------------------------------------------------------
    max_attempts = models.PositiveSmallIntegerField(
        default=retry.DEFAULT_MAX_ATTEMPTS, validators=_limits("max_attempts")
    )
    initial_delay = models.PositiveIntegerField(
        "first retry after (s)",
        default=retry.DEFAULT_INITIAL_DELAY,
        validators=_limits("initial_delay"),
    )
    backoff_factor = models.FloatField(
        default=retry.DEFAULT_BACKOFF_FACTOR,
        validators=_limits("backoff_factor"),
        help_text="Each retry waits this many times longer than the previous one.",
    )
    max_delay = models.PositiveIntegerField(
        "longest wait between retries (s)",
        default=retry.DEFAULT_MAX_DELAY,
        validators=_limits("max_delay"),
    )
    rate_limit = models.PositiveIntegerField(
        "rate limit (per second)",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Leave empty for the platform's limit; higher values are held to it.",
    )

    # --- health, written by the pipeline -----------------------------------------------------
    disabled_reason = models.CharField(max_length=300, blank=True, editable=False)
    disabled_at = models.DateTimeField(null=True, blank=True, editable=False)
    failing_since = models.DateTimeField(null=True, blank=True, editable=False)
    alerted_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_success_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.CharField(max_length=300, blank=True, editable=False)
    last_error_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Running totals: counting the outbox on every page view would not scale.
    delivered_count = models.BigIntegerField(default=0, editable=False)
    failed_count = models.BigIntegerField(default=0, editable=False)
    retried_count = models.BigIntegerField(default=0, editable=False)
    attempt_count = models.BigIntegerField(default=0, editable=False)

    # --- Test Connection ----------------------------------------------------------------------
    last_test_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_test_ok = models.BooleanField(null=True, editable=False)
    last_test_status = models.PositiveSmallIntegerField(null=True, blank=True, editable=False)
    last_test_ms = models.PositiveIntegerField(null=True, blank=True, editable=False)
    last_test_message = models.CharField(max_length=300, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["owner", "name"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_destination_name"),
        ]

    def __str__(self) -> str:
        return self.name

    def retry_policy(self) -> retry.RetryPolicy:
        return retry.RetryPolicy(
            max_attempts=self.max_attempts,
            initial_delay=self.initial_delay,
            backoff_factor=self.backoff_factor,
            max_delay=self.max_delay,
        )

    @property
    def success_rate(self) -> float | None:
        done = self.delivered_count + self.failed_count
        return None if not done else self.delivered_count / done


class Status(models.TextChoices):
    PENDING = "pending", "Pending"  # waiting for next_attempt_at (or for re-enabling)
    SENDING = "sending", "Sending"  # claimed by a worker until lease_expires_at
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"  # dead letter: attempts exhausted or refused for good


def dumps_json(value: Any) -> str:
    """JSON text; datetimes as `isoformat()` writes them (event payloads carry them as such)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # e.g. an integer beyond 64 bits: the standard library takes it
        return json.dumps(value, default=_isoformat)


def _isoformat(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class JSONTextField(models.TextField):
    """A JSON document stored as text, not `jsonb`: for a column that is written and read
    whole and never queried inside.

    The outbox's payload is written for every event and destination and read back once, as
    text, by the worker that sends it. As `jsonb` PostgreSQL parsed every payload on insert and
    printed it again on read; as text the outbox insert costs ~11 us less backend CPU per row
    (measured: 37 -> 26 us with the outbox's indexes). Python sees the same dicts and lists.
    """

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return None if value is None else orjson.loads(value)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError:
                return value
        return value

    def get_prep_value(self, value: Any) -> Any:
        return None if value is None else dumps_json(value)

    def value_to_string(self, obj: models.Model) -> str:
        return dumps_json(self.value_from_object(obj))


class DeliveryQuerySet(models.QuerySet):
    def events(self) -> int:
        """The events these rows carry (a database destination's row carries a batch)."""
        return self.aggregate(n=models.Sum("events"))["n"] or 0


class Delivery(models.Model):
    """One event for one destination: the outbox row and its retry state."""

    id = models.BigAutoField(primary_key=True)
    # No database-level foreign keys (as for telemetry): the listener writes thousands of rows a
    # second, and each checked key cost a trigger event and a `FOR KEY SHARE` lookup of the
    # destination and owner rows at commit (~13 us of PostgreSQL CPU per row). Deleting a
    # destination or owner still cascades, in Django. A listener whose route cache still holds a
    # just-deleted destination (up to outbox.ROUTE_TTL) writes rows for it that nobody claims;
    # the sweep removes them (`actions.remove_orphans`). With the keys, that commit failed and
    # the batch's telemetry went to quarantine.
    owner = models.ForeignKey(
        Owner, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    destination = models.ForeignKey(
        Destination,
        on_delete=models.CASCADE,
        related_name="deliveries",
        db_index=False,
        db_constraint=False,
    )
    event_id = models.CharField(max_length=64)
    event_type = models.CharField(max_length=32)
    device = models.CharField("device id", max_length=63)
    # The webhook-id: derived from (destination, event), so stable across retries and replays.
    message_id = models.CharField(max_length=40)
    payload = JSONTextField()
    # How many events the row carries. A row of a batch kind (database) carries the events of
    # one listener batch, its payload their list ("a pack", see `outbox.py`); every other row
    # carries one event, its payload that event.
    events = models.PositiveIntegerField(
        default=1, help_text="A database destination's row carries a batch of events."
    )
    created_at = models.DateTimeField(default=timezone.now)

    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    lease_token = models.CharField(max_length=32, null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    replays = models.PositiveSmallIntegerField(default=0)

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            # One delivery per destination and event. Event ids are new in the batch that writes
            # them ("tel_<telemetry id>"), so the listener never meets this constraint; it is
            # a guard (a violation fails the batch, which the listener then retries message by
            # message), not a dedup: `ON CONFLICT` cost ~9 us of backend CPU per outbox row.
            models.UniqueConstraint(fields=["destination", "event_id"], name="unique_delivery"),
        ]
        indexes = [
            # The claim: due rows of one destination, oldest first. Partial, so it stays the
            # size of the backlog, not of the history.
            models.Index(
                fields=["destination", "next_attempt_at", "id"],
                condition=Q(status="pending"),
                name="delivery_due",
            ),
            models.Index(
                fields=["lease_expires_at"], condition=Q(status="sending"), name="delivery_leased"
            ),
            models.Index(fields=["owner", "-id"], name="delivery_owner_recent"),
            TimeOrderIndex(fields=["created_at"], name="delivery_created"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id} → {self.destination_id}"


class Outcome(models.TextChoices):
    DELIVERED = "delivered", "Delivered"
    RETRY = "retry", "Failed, will retry"
    FAILED = "failed", "Failed for good"
    GONE = "gone", "Gone (410): destination disabled"
    INTERRUPTED = "interrupted", "Interrupted (worker lost)"


class Attempt(models.Model):
    """One try of one delivery: the per-attempt log shown to the owner."""

    id = models.BigAutoField(primary_key=True)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+", db_index=False)
    destination = models.ForeignKey(
        Destination, on_delete=models.CASCADE, related_name="attempts", db_index=False
    )
    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveSmallIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=12, choices=Outcome.choices)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    # What the owner sees: generic for network failures (details are in the worker's log).
    error = models.CharField(max_length=300, blank=True)
    response = models.CharField("response (truncated)", max_length=512, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["destination", "-id"], name="attempt_destination_recent"),
            models.Index(fields=["owner", "-id"], name="attempt_owner_recent"),
            TimeOrderIndex(fields=["started_at"], name="attempt_started"),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}: {self.outcome}"


class AlertKind(models.TextChoices):
    FAILING = "failing", "Keeps failing"
    DISABLED = "disabled", "Disabled"


class DeliveryAlert(models.Model):
    """A notice to the owner that a destination needs attention (shown on Data Delivery)."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+")
    destination = models.ForeignKey(Destination, on_delete=models.CASCADE, related_name="alerts")
    kind = models.CharField(max_length=12, choices=AlertKind.choices)
    message = models.CharField(max_length=300)
    created_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.message


# The kinds' child models live in their sub-packages; importing them here registers them with
# this app (the app registry only looks at `models.py`).
from .database.models import DatabaseBatch, DatabaseDestination  # noqa: E402
from .webhook.models import WebhookDestination, WebhookHeader  # noqa: E402

__all__ = [
    "Attempt",
    "DatabaseBatch",
    "DatabaseDestination",
    "Delivery",
    "DeliveryAlert",
    "Destination",
    "Outcome",
    "Status",
    "WebhookDestination",
    "WebhookHeader",
]
