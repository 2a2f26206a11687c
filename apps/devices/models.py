from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from apps.core.fields import EncryptedTextField
from apps.owners.models import Owner

# SPEC §4: globally unique, lowercase, no MQTT wildcards, separators, whitespace or NUL.
DEVICE_ID_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
validate_device_id = RegexValidator(
    DEVICE_ID_RE,
    "Use 1–63 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit.",
)
# A Tasmota topic may be mixed case (Tasmota's default is "tasmota_XXXXXX"), same exclusions.
validate_topic = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$",
    "Use 1–63 characters: letters, digits, '-' and '_', starting with a letter or digit.",
)


class Profile(models.TextChoices):
    ESP32_LAMP = "esp32-lamp", "ESP32 lamp"
    TASMOTA = "tasmota", "Tasmota"
    METER_V2 = "meter-v2", "Power meter (v2)"


class Connection(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    ONLINE = "online", "Online"
    OFFLINE = "offline", "Offline"


class OfflinePolicy(models.TextChoices):
    REJECT = "reject", "Refuse commands while offline"
    QUEUE = "queue", "Hold commands until they expire, send on reconnect"


class TasmotaTopicOrder(models.TextChoices):
    PREFIX_FIRST = "prefix", "cmnd/{topic}/… (Tasmota default)"
    TOPIC_FIRST = "topic", "{topic}/cmnd/… (FullTopic %topic%/%prefix%/)"


class Device(models.Model):
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="devices")
    device_id = models.CharField(
        "device id", max_length=63, unique=True, validators=[validate_device_id]
    )
    name = models.CharField(max_length=120, blank=True)
    location = models.CharField(max_length=120, blank=True)
    profile = models.CharField(max_length=16, choices=Profile.choices)
    # The key in the device's MQTT topics: the device id, or a Tasmota device's own topic.
    topic = models.CharField(max_length=63, validators=[validate_topic])
    topic_order = models.CharField(
        max_length=8,
        choices=TasmotaTopicOrder.choices,
        default=TasmotaTopicOrder.PREFIX_FIRST,
        help_text="Tasmota only: which FullTopic order the device uses; learnt from its messages.",
    )
    relay_count = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(8)]
    )
    expected_interval = models.PositiveIntegerField(
        "expected interval (s)",
        default=60,
        validators=[MinValueValidator(1)],
        help_text="How often the device reports; offline after several intervals of silence.",
    )
    offline_policy = models.CharField(
        max_length=8, choices=OfflinePolicy.choices, default=OfflinePolicy.REJECT
    )
    created_at = models.DateTimeField(auto_now_add=True)

    # --- state, written by the listener (apps.devices.ingest) -----------------------------
    connection = models.CharField(
        max_length=8, choices=Connection.choices, default=Connection.UNKNOWN
    )
    connection_changed_at = models.DateTimeField(null=True, blank=True)
    # {"1": "ON", "2": "OFF"}: relay index (as text) -> state.
    power = models.JSONField(default=dict, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_reading = models.JSONField(default=dict, blank=True)
    last_reading_at = models.DateTimeField(null=True, blank=True)
    firmware = models.CharField(max_length=64, blank=True)
    device_type = models.CharField(max_length=32, blank=True)
    ip_address = models.CharField(max_length=45, blank=True)
    rssi = models.IntegerField(null=True, blank=True)
    uptime = models.CharField(max_length=32, blank=True)
    # meter-v2 sequence tracking, per boot.
    boot_id = models.CharField(max_length=64, blank=True)
    last_seq = models.BigIntegerField(null=True, blank=True)
    seq_gaps = models.PositiveIntegerField(default=0)
    seq_missing = models.PositiveBigIntegerField(default=0)
    seq_duplicates = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["device_id"]
        constraints = [
            models.UniqueConstraint(fields=["profile", "topic"], name="unique_profile_topic"),
        ]
        indexes = [models.Index(fields=["owner", "connection"])]

    def __str__(self) -> str:
        return self.name or self.device_id

    def save(self, *args, **kwargs) -> None:
        if not self.topic:
            self.topic = self.device_id
        if self.profile != Profile.TASMOTA:
            self.relay_count = 1
        super().save(*args, **kwargs)

    @property
    def offline_after(self) -> timedelta:
        return timedelta(seconds=self.expected_interval * settings.DEVICE_OFFLINE_FACTOR)

    def is_silent(self, now=None) -> bool:
        """True when the device has not been heard from for longer than its offline timeout."""
        if self.last_seen_at is None:
            return False
        return (now or timezone.now()) - self.last_seen_at > self.offline_after

    def relays(self) -> list[int]:
        return list(range(1, self.relay_count + 1))


class EventKind(models.TextChoices):
    TELEMETRY = "telemetry", "Telemetry"
    STATUS = "status", "Status"
    HELLO = "hello", "Hello"
    ACK = "command_ack", "Command ack"
    OTA = "ota_status", "OTA status"


class Telemetry(models.Model):
    """One accepted message of a device: a reading, a status report, a hello, an ack."""

    id = models.BigAutoField(primary_key=True)
    # The hottest table: no database-level foreign keys and no single-column indexes. The
    # listener only writes rows for devices it has just read; deleting a device or an owner
    # cascades in Django (which deletes these rows first); the composite indexes below lead
    # with both columns. An FK check locks the referenced row for every inserted row: ~22 us
    # of PostgreSQL CPU per message, and two more index entries, at thousands a second.
    owner = models.ForeignKey(
        Owner, on_delete=models.CASCADE, related_name="+", db_constraint=False, db_index=False
    )
    device = models.ForeignKey(
        Device,
        on_delete=models.CASCADE,
        related_name="telemetry",
        db_constraint=False,
        db_index=False,
    )
    kind = models.CharField(max_length=16, choices=EventKind.choices)
    ts = models.DateTimeField(help_text="Device time when it sent one, else reception time.")
    received_at = models.DateTimeField()
    seq = models.BigIntegerField(null=True, blank=True)
    # The device's boot id when the message came (meter-v2): (device, boot, seq) is unique,
    # so a message the broker sends again after a crash is stored once, whoever receives it.
    boot = models.CharField(max_length=64, blank=True, default="")
    topic = models.CharField(max_length=255)
    data = models.JSONField()

    class Meta:
        verbose_name_plural = "telemetry"
        ordering = ["-ts"]
        indexes = [
            models.Index(fields=["device", "-ts"]),
            models.Index(fields=["owner", "-received_at"]),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["device", "boot", "seq"],
                condition=models.Q(seq__isnull=False),
                name="unique_device_boot_seq",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.device_id} {self.kind} @ {self.ts:%Y-%m-%d %H:%M:%S}"


class TransitionKind(models.TextChoices):
    CONNECTION = "connection", "Connection"
    POWER = "power", "Power"


class Transition(models.Model):
    """A change of a device's connection or power state, with its cause.

    Workers that react to changes (alerts, deliveries) claim a row atomically by setting
    `processed_at` with a conditional UPDATE; zero updated rows means another worker has it.
    """

    id = models.BigAutoField(primary_key=True)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="transitions")
    kind = models.CharField(max_length=16, choices=TransitionKind.choices)
    relay = models.PositiveSmallIntegerField(null=True, blank=True)
    old = models.CharField(max_length=16, blank=True)
    new = models.CharField(max_length=16)
    cause = models.CharField(max_length=32)
    at = models.DateTimeField()
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["device", "-at"])]

    def __str__(self) -> str:
        relay = f"[{self.relay}]" if self.relay else ""
        return f"{self.device_id} {self.kind}{relay}: {self.old or '–'} → {self.new} ({self.cause})"


class QuarantineReason(models.TextChoices):
    UNKNOWN_DEVICE = "unknown_device", "Unknown device"
    MALFORMED = "malformed", "Malformed payload"
    OVERSIZE = "oversize", "Payload too large"
    FOREIGN_TOPIC = "foreign_topic", "Topic outside the contracts"
    INVALID = "invalid", "Invalid content"
    BAD_ID = "bad_id", "Invalid device id in topic"


class QuarantinedMessage(models.Model):
    """A message the listener refused, kept with its reason (payload truncated)."""

    id = models.BigAutoField(primary_key=True)
    received_at = models.DateTimeField(db_index=True)
    topic = models.CharField(max_length=255)
    reason = models.CharField(max_length=16, choices=QuarantineReason.choices, db_index=True)
    detail = models.CharField(max_length=255, blank=True)
    payload = models.BinaryField(help_text="The first bytes of the payload.")
    size = models.PositiveIntegerField()
    # Set when the topic names a device we know (so its owner can see why it was refused).
    owner = models.ForeignKey(
        Owner, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    device = models.ForeignKey(
        Device, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    PAYLOAD_KEPT = 2048

    class Meta:
        ordering = ["-received_at", "-id"]

    def __str__(self) -> str:
        return f"{self.reason}: {self.topic}"

    @property
    def payload_preview(self) -> str:
        return bytes(self.payload).decode("utf-8", errors="backslashreplace")[:500]


class DeviceCredential(models.Model):
    """The device's own MQTT login, provisioned into the broker by the platform."""

    uuid = models.UUIDField(default=uuid.uuid4, editable=False, unique=True)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+")
    device = models.OneToOneField(Device, on_delete=models.CASCADE, related_name="credential")
    username = models.CharField(max_length=63, unique=True)
    password = EncryptedTextField()
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.username


# --- commands (apps.devices.commands) ---------------------------------------------------------


class CommandStatus(models.TextChoices):
    PENDING = "pending", "Pending"  # row written, publish in progress
    QUEUED = "queued", "Held until the device is online"
    PUBLISHED = "published", "Published"
    CONFIRMED = "confirmed", "Confirmed"
    UNCONFIRMED = "unconfirmed", "Unconfirmed"  # published, the device never reported it
    EXPIRED = "expired", "Expired"  # held, the device did not come back in time
    FAILED = "failed", "Failed"  # the broker refused or timed out, or the device acked an error


class IssuerType(models.TextChoices):
    USER = "user", "User"
    SCHEDULE = "schedule", "Schedule"
    API_KEY = "api_key", "API key"
    SYSTEM = "system", "System"


class Command(models.Model):
    """One command to a device and what became of it. Written by apps.devices.commands only."""

    OPEN = (CommandStatus.PENDING, CommandStatus.QUEUED, CommandStatus.PUBLISHED)

    id = models.BigAutoField(primary_key=True)
    request_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="commands")
    action = models.CharField(max_length=64, help_text="ON / OFF / TOGGLE, or a meter command")
    relay = models.PositiveSmallIntegerField(null=True, blank=True)
    params = models.JSONField(default=dict, blank=True)
    # The power state that confirms the command when the device reports state (no request id).
    expected = models.CharField(max_length=8, blank=True)
    # Who asked: a generic reference, so that deleting a user or key keeps the log readable.
    issuer_type = models.CharField(max_length=16, choices=IssuerType.choices)
    issuer_id = models.CharField(max_length=64, blank=True)
    issuer_label = models.CharField(max_length=150, blank=True)
    status = models.CharField(
        max_length=12, choices=CommandStatus.choices, default=CommandStatus.PENDING
    )
    detail = models.CharField(max_length=255, blank=True)
    topic = models.CharField(max_length=255, blank=True)
    payload = models.TextField(blank=True)
    issued_at = models.DateTimeField()
    expires_at = models.DateTimeField(help_text="A held command is dropped after this.")
    published_at = models.DateTimeField(null=True, blank=True)
    confirm_by = models.DateTimeField(
        null=True, blank=True, help_text="Unconfirmed when the device has not reported by then."
    )
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-issued_at", "-id"]
        indexes = [
            models.Index(fields=["device", "status"]),
            models.Index(fields=["owner", "-issued_at"]),
            models.Index(fields=["status", "confirm_by"]),
        ]

    def __str__(self) -> str:
        relay = f"[{self.relay}]" if self.relay else ""
        return f"{self.action}{relay} → {self.device_id} ({self.status})"

    @property
    def is_open(self) -> bool:
        return self.status in self.OPEN

    @property
    def latency(self) -> timedelta | None:
        """Publish to confirmation."""
        if self.status == CommandStatus.CONFIRMED and self.published_at and self.resolved_at:
            return self.resolved_at - self.published_at
        return None
