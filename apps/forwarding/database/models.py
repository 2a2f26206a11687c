"""Database destinations (rows into an owner's own table) and their per-batch log."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from apps.core.fields import EncryptedTextField
from apps.owners.models import Owner

from .. import egress
from ..models import Destination
from . import identifiers, mapping
from .base import ConnectionSettings, Target

KIND = "database"

MAX_BATCH = 5000
MAX_FLUSH_MS = 60_000

# A DNS name or an IP literal, nothing else: no "/path" (a Unix socket to libpq), no
# "a,b" (libpq's multi-host lists), no "user@", no spaces, no leading "-" (option injection).
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?",
    re.ASCII,
)
_USERNAME = re.compile(r"[A-Za-z0-9_.@$+-]{1,80}", re.ASCII)


def validate_host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise ValidationError(
            "Give one host name or IP address (no sockets, lists, ports or spaces).",
            code="host",
        )


def validate_username(value: str) -> None:
    if not _USERNAME.fullmatch(value):
        raise ValidationError(
            "User names may hold letters, digits and _ . @ $ + - (up to 80).", code="username"
        )


class Engine(models.TextChoices):
    POSTGRES = "postgres", "PostgreSQL"
    MYSQL = "mysql", "MySQL / MariaDB"


DEFAULT_PORTS = {Engine.POSTGRES: 5432, Engine.MYSQL: 3306}


class TlsMode(models.TextChoices):
    DISABLE = "disable", "Off (plain text)"
    REQUIRE = "require", "Required, certificate not checked"
    VERIFY_CA = "verify-ca", "Required, certificate checked against public CAs"
    VERIFY_FULL = "verify-full", "Required, certificate and host name checked"


class WriteMode(models.TextChoices):
    APPEND = "append", "Append (one row per event)"
    UPSERT = "upsert", "Upsert (insert or update on the key columns)"


def _default_mapping() -> list[list[str]]:
    return [list(pair) for pair in mapping.DEFAULT_MAPPING]


def _default_keys() -> list[str]:
    return ["event_id"]


class DatabaseDestination(Destination):
    engine = models.CharField(max_length=8, choices=Engine.choices, default=Engine.POSTGRES)
    host = models.CharField(max_length=253, validators=[validate_host])
    port = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
        help_text="Empty: 5432 for PostgreSQL, 3306 for MySQL/MariaDB.",
    )
    database_name = models.CharField("database", max_length=63)
    schema = models.CharField(
        max_length=63,
        blank=True,
        default="public",
        help_text="PostgreSQL schema of the table. Leave empty for MySQL/MariaDB.",
    )
    username = models.CharField(max_length=80, validators=[validate_username])
    password = EncryptedTextField(blank=True, help_text="Stored encrypted, never shown again.")
    tls_mode = models.CharField(
        "TLS", max_length=12, choices=TlsMode.choices, default=TlsMode.REQUIRE
    )
    table = models.CharField("target table", max_length=63)
    column_mapping = models.JSONField(default=_default_mapping)
    write_mode = models.CharField(max_length=8, choices=WriteMode.choices, default=WriteMode.UPSERT)
    key_columns = models.JSONField(
        default=_default_keys,
        blank=True,
        help_text="Upsert: the columns of the table's primary key or unique index.",
    )
    batch_size = models.PositiveIntegerField(
        default=500, validators=[MinValueValidator(1), MaxValueValidator(MAX_BATCH)]
    )
    flush_interval_ms = models.PositiveIntegerField(
        "flush interval (ms)",
        # Short: the pipeline already gathers what became due between its looks (every 0.1 s),
        # so a long wait buys few extra rows per statement and costs every row its latency.
        default=100,
        validators=[MaxValueValidator(MAX_FLUSH_MS)],
        help_text="A partial batch is written at most this long after the previous one "
        "(a full batch at once).",
    )

    # --- health, written by the transport ------------------------------------------------------
    # A failed batch pauses the destination for one back-off step; then one probe row is tried.
    failure_streak = models.PositiveIntegerField(default=0, editable=False)
    paused_until = models.DateTimeField(null=True, blank=True, editable=False)
    # Set when the destination cannot work as configured (login, table, columns): "in error".
    error_reason = models.CharField(max_length=300, blank=True, editable=False)
    error_since = models.DateTimeField(null=True, blank=True, editable=False)
    batch_count = models.BigIntegerField(default=0, editable=False)
    last_batch_at = models.DateTimeField(null=True, blank=True, editable=False)
    test_report = models.JSONField(null=True, blank=True, editable=False)

    class Meta:
        verbose_name = "database destination"

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.kind = KIND
        if self.engine == Engine.MYSQL:
            self.schema = ""
        # Saved = edited by its owner (the pipeline writes health with update()): the edit may
        # be the fix, so the next batch is tried at once instead of after the pause.
        self.failure_streak = 0
        self.paused_until = None
        self.error_reason = ""
        self.error_since = None
        super().save(*args, **kwargs)

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[Engine(self.engine)]

    @property
    def effective_schema(self) -> str:
        # MySQL has no schemas inside a database: the database is the schema.
        return self.database_name if self.engine == Engine.MYSQL else (self.schema or "public")

    @property
    def upsert(self) -> bool:
        return self.write_mode == WriteMode.UPSERT

    @property
    def in_error(self) -> bool:
        return bool(self.error_reason)

    def clean(self) -> None:
        super().clean()
        errors: dict[str, Any] = {}
        checks: list[tuple[str, str, str]] = [
            ("database_name", self.database_name, "database name"),
            ("table", self.table, "table name"),
        ]
        if self.engine == Engine.POSTGRES:
            checks.append(("schema", self.schema or "public", "schema name"))
        elif self.schema and self.schema != self.database_name:
            errors["schema"] = "MySQL/MariaDB has no schemas inside a database: leave it empty."
        for field, value, what in checks:
            if value:
                try:
                    identifiers.check(value, what)
                except ValidationError as exc:
                    errors[field] = exc
        key_columns = self.key_columns if self.upsert else []
        try:
            mapping.validate(self.column_mapping, key_columns or [], self.upsert)
        except ValidationError as exc:
            errors["column_mapping"] = exc
        if not self.upsert:
            self.key_columns = []
        if self.host and "host" not in errors:
            try:
                egress.resolve_checked(
                    self.host, self.effective_port, timeout=egress.SAVE_LOOKUP_TIMEOUT
                )
            except egress.EgressDenied:
                # One text for "does not resolve" and "resolves somewhere refused": no probing.
                errors["host"] = egress.SAVE_ERROR
        if errors:
            raise ValidationError(errors)

    # --- what the transport needs ----------------------------------------------------------------

    def connection_settings(self) -> ConnectionSettings:
        return ConnectionSettings(
            engine=self.engine,
            host=self.host,
            port=self.effective_port,
            database=self.database_name,
            schema=self.effective_schema,
            username=self.username,
            password=self.password or None,
            tls_mode=self.tls_mode,
            context=f"destination={self.pk} owner={self.owner_id}",
        )

    def target(self) -> Target:
        return Target(
            schema=self.effective_schema,
            table=self.table,
            columns=tuple(column for column, _expr in self.column_mapping),
            key_columns=tuple(self.key_columns or ()) if self.upsert else (),
            upsert=self.upsert,
        )

    def mapping_text(self) -> str:
        return mapping.as_text(self.column_mapping)


class BatchOutcome(models.TextChoices):
    WRITTEN = "written", "Written"
    PARTIAL = "partial", "Written, bad rows set aside"
    RETRY = "retry", "Failed, will retry"
    ERROR = "error", "Destination in error"


class DatabaseBatch(models.Model):
    """One flush of a database destination: the per-batch log on the Data Delivery tab."""

    id = models.BigAutoField(primary_key=True)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="+", db_index=False)
    destination = models.ForeignKey(
        DatabaseDestination, on_delete=models.CASCADE, related_name="batches", db_index=False
    )
    started_at = models.DateTimeField(default=timezone.now)
    duration_ms = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=8, choices=BatchOutcome.choices)
    rows = models.PositiveIntegerField(default=0)
    written = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField("dead letters", default=0)
    retried = models.PositiveIntegerField(default=0)
    statements = models.PositiveIntegerField(default=0)
    first_delivery_id = models.BigIntegerField(null=True, blank=True)
    last_delivery_id = models.BigIntegerField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)

    class Meta:
        verbose_name_plural = "database batches"
        indexes = [
            models.Index(fields=["destination", "-id"], name="dbbatch_destination_recent"),
            models.Index(fields=["owner", "-id"], name="dbbatch_owner_recent"),
            models.Index(fields=["started_at"], name="dbbatch_started"),
        ]

    def __str__(self) -> str:
        return f"batch of {self.rows} → {self.destination_id}: {self.outcome}"
