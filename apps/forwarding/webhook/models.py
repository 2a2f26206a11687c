"""Webhook destinations and their custom headers."""

from __future__ import annotations

import re
import uuid
from datetime import datetime

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from apps.core.fields import EncryptedTextField
from apps.owners.models import Owner

from .. import egress, template
from ..models import Destination
from . import signing

KIND = "webhook"

MAX_TIMEOUT = 30  # seconds; also bounds how long a worker waits for a hanging receiver

# Headers the platform sets itself, or that would let an owner break the HTTP framing.
RESERVED_HEADERS = re.compile(
    r"(?i)^(webhook-.*|host|content-length|content-type|transfer-encoding|connection|"
    r"keep-alive|upgrade|te|trailer|proxy-.*|expect)$"
)
validate_header_name = RegexValidator(
    r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$", "Letters, digits and - only (an HTTP token)."
)


class Method(models.TextChoices):
    POST = "POST", "POST"
    PUT = "PUT", "PUT"


def _validate_template(value: object) -> None:
    if value is None:
        return
    try:
        template.validate(value)
    except template.TemplateError as exc:
        raise ValidationError(str(exc)) from None


def _validate_secret(value: object) -> None:
    text = value.reveal() if hasattr(value, "reveal") else value
    if not text or not isinstance(text, str):
        return
    try:
        signing.validate_secret(text)
    except signing.SecretError as exc:
        raise ValidationError(str(exc)) from None


class WebhookDestination(Destination):
    url = models.URLField("URL", max_length=2000)
    method = models.CharField(max_length=4, choices=Method.choices, default=Method.POST)
    timeout = models.PositiveSmallIntegerField(
        "timeout (s)",
        default=10,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_TIMEOUT)],
        help_text="Total time for one request, including a slowly trickling response.",
    )
    max_in_flight = models.PositiveSmallIntegerField(
        "concurrent requests",
        default=16,
        validators=[MinValueValidator(1), MaxValueValidator(128)],
        help_text="Requests in flight at once to this URL, per delivery worker.",
    )
    secret = EncryptedTextField(
        "signing secret",
        blank=True,
        validators=[_validate_secret],
        help_text="whsec_… (Standard Webhooks). Generated when left empty.",
    )
    previous_secret = EncryptedTextField(blank=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    payload_template = models.JSONField(
        null=True,
        blank=True,
        validators=[_validate_template],
        help_text='JSON with ${path} placeholders, e.g. {"id": "${device.id}", "v": '
        '"${data.voltage}"}. Empty: the standard {"type", "timestamp", "data"} envelope.',
    )

    class Meta:
        verbose_name = "webhook destination"

    def save(self, *args, **kwargs) -> None:
        self.kind = KIND
        if not self.secret:
            self.secret = signing.generate_secret()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        super().clean()
        if self.url:
            egress.validate_webhook_url(self.url)

    def signing_keys(self, now: datetime | None = None) -> list[bytes]:
        """The keys to sign with now: the current one, and the previous one during its grace."""
        keys = [signing.decode_secret(self.secret.reveal())]
        now = now or timezone.now()
        if (
            self.previous_secret
            and self.previous_secret_expires_at
            and self.previous_secret_expires_at > now
        ):
            keys.append(signing.decode_secret(self.previous_secret.reveal()))
        return keys


class WebhookHeader(models.Model):
    """A custom request header; its value is either plain or secret (write-only, encrypted)."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # Copied from the destination: it binds the encrypted value to its owner and scopes the row.
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+", editable=False)
    destination = models.ForeignKey(
        WebhookDestination, on_delete=models.CASCADE, related_name="headers"
    )
    name = models.CharField(max_length=100, validators=[validate_header_name])
    value = models.CharField(max_length=1000, blank=True)
    secret_value = EncryptedTextField(
        blank=True, help_text="For tokens: stored encrypted, never shown again."
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["destination", "name"], name="unique_webhook_header"),
        ]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        self.owner_id = self.destination.owner_id
        super().save(*args, **kwargs)

    def clean(self) -> None:
        if self.name and RESERVED_HEADERS.match(self.name):
            raise ValidationError({"name": "The platform sets this header itself."})
        if bool(self.value) == bool(self.secret_value):
            raise ValidationError("Give either a value or a secret value.")
        for text in (self.value, self.secret_value.reveal() if self.secret_value else ""):
            if any(c in text for c in "\r\n\0"):
                raise ValidationError("Header values are one line.")

    def header_value(self) -> str:
        return self.secret_value.reveal() if self.secret_value else self.value
