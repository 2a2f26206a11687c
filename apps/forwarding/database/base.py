"""What both engines share: connection settings, column facts, errors and their classes.

Every failure of a write is sorted into one of four classes, because each calls for a different
reaction (issue 4, "Failures"):

- CONTENT: the server refused these rows (a NOT NULL, CHECK or unique violation, a value out of
  range). Retrying cannot help; the batch is split to find the rows at fault, which become dead
  letters carrying the server's message, and the rest is written.
- DESTINATION: the destination as configured cannot work (login refused, database, table or
  column missing, no privilege, no unique index for the upsert keys). Retrying every row would be
  a storm of futile logins; the destination goes "in error" with the reason, the owner is
  alerted, and one probe per back-off step checks whether it was fixed.
- TRANSIENT: the server is there but could not take the batch now (deadlock, lock or statement
  timeout, restart, too many connections). The batch is retried on the back-off schedule.
- NETWORK: no connection (refused, timed out, reset, DNS, the egress guard). Like TRANSIENT,
  but owners only ever see `egress.GENERIC_ERROR`: details would map the operator's network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from apps.core.crypto import Secret

from .. import egress

CONNECT_TIMEOUT = 5  # seconds for DNS, then again per address tried
STATEMENT_TIMEOUT = 20  # seconds, one statement in the owner's database
LOCK_TIMEOUT = 10  # seconds waiting for a row or table lock before giving up (transient)


class ErrorClass(enum.Enum):
    CONTENT = "content"
    DESTINATION = "destination"
    TRANSIENT = "transient"
    NETWORK = "network"


class SinkError(Exception):
    """A classified failure. `message` is what the owner may see; the cause is for the log."""

    def __init__(self, kind: ErrorClass, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message[:300]


def network_error() -> SinkError:
    return SinkError(ErrorClass.NETWORK, egress.GENERIC_ERROR)


class Family(enum.Enum):
    """Coarse value types, enough to match a mapped value with a column and to suggest DDL."""

    INT = "integer"
    FLOAT = "number"
    BOOL = "boolean"
    TEXT = "text"
    TIME = "timestamp"
    JSON = "json"
    OTHER = "other"  # uuid, binary, arrays, geometry…: not checked, the server decides


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    data_type: str  # as the server names it (`character varying`, `bigint`, `datetime`…)
    family: Family
    nullable: bool
    has_default: bool  # a default, identity, serial, auto_increment or generated column

    @property
    def required(self) -> bool:
        return not self.nullable and not self.has_default


@dataclass(frozen=True, slots=True)
class TableInfo:
    columns: dict[str, Column]
    unique_keys: tuple[frozenset[str], ...]  # primary key and unique indexes, as column sets
    transactional: bool = True  # MySQL: False for MyISAM and other engines without rollback


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Where to connect and as whom. The password stays a `Secret` (masked in every repr) and
    is revealed only in the call that opens the connection."""

    engine: str
    host: str
    port: int
    database: str
    schema: str
    username: str
    password: Secret | None
    tls_mode: str
    context: str = ""  # for the log: "destination=12"

    def __repr__(self) -> str:
        return (
            f"ConnectionSettings({self.engine}://{self.username}@{self.host}:{self.port}/"
            f"{self.database} tls={self.tls_mode})"
        )


@dataclass(frozen=True, slots=True)
class Target:
    """The table rows go to and how: what a write needs besides the connection."""

    schema: str
    table: str
    columns: tuple[str, ...]  # in mapping order
    key_columns: tuple[str, ...]  # empty for append
    upsert: bool


@dataclass
class Report:
    """Test Connection's findings, stored on the destination and shown as a list."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {"errors": self.errors, "warnings": self.warnings, "notes": self.notes}

    def summary(self, limit: int = 300) -> str:
        text = " ".join(self.errors or self.notes[:1]) or "OK"
        if self.warnings:
            text += " — Warning: " + "; ".join(self.warnings) + "."
        return text if len(text) <= limit else text[: limit - 1] + "…"
