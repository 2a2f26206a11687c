"""The registry of delivery kinds: one outbox, one pipeline, one monitoring page; N kinds.

A kind is a sub-package (`apps/forwarding/webhook/`, `apps/forwarding/database/`) with a child
model of `Destination` and a `Transport`. The pipeline (`pipeline.py`) only speaks this
interface, in one of two ways:

* it claims rows (under a lease), hands them to the transport (`capacity`, `start`), and records
  the `Result`s the transport reports — webhooks: each row is its own concurrent request;
* or, for a transport with `pulls = True`, it only `kick`s it while the destination has due
  rows and `release`s it when its budget is spent; the transport claims, writes and records
  batches itself and reports one `claims.Progress` per batch — database sinks, which hold a
  batch by row locks for the length of one bounded write (one outbox update per row).

Adding a kind: write the sub-package, then add one line to KINDS.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from django.apps import apps
from django.db.models import Model
from django.utils.module_loading import import_string

from .claims import Claimed, Result
from .retry import RetryPolicy


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """What the pipeline needs of a destination; `settings` is the kind's own (decrypted) part.

    Built in the worker and never serialised: secrets stay in its memory."""

    destination_id: int
    owner_id: int
    kind: str
    version: float  # changes whenever the destination is edited
    policy: RetryPolicy
    rate_limit: int | None
    lease_seconds: float
    settings: Any


@dataclass(frozen=True, slots=True)
class TestResult:
    ok: bool
    message: str
    status_code: int | None = None
    duration_ms: int | None = None


class Transport(Protocol):
    def load(self, destination_ids: Collection[int]) -> dict[int, TargetConfig]:
        """Configs of these (enabled) destinations, secrets decrypted."""

    def capacity(self, config: TargetConfig, in_flight: int) -> int:
        """How many more rows this worker may hand over now (in-flight caps, batch sizes)."""

    def start(
        self, config: TargetConfig, rows: list[Claimed], report: Callable[[Result], None]
    ) -> None:
        """Begin sending without blocking; call `report` once per row, in the pump's loop
        (`pump.py`; a transport using threads reports through `Pump.report_threadsafe`)."""

    # Self-claiming transports (`pulls = True`) implement these instead of capacity/start:
    #   kick(config, report) -> bool   pull due rows until none are left; False while paused
    #   release(destination_id)        stop after the batch in hand

    def test(self, destination: Model) -> TestResult:
        """Test Connection: blocking, bounded by the destination's timeout."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Kind:
    key: str
    label: str
    model_label: str
    transport_path: str
    # Rows per unit of the platform's rate limits (DELIVERY_*_RATE count webhook requests):
    # a row of a batched database write costs the workers a small fraction of a request.
    rate_scale: int = 1
    # Kinds that write batches (databases) get one outbox row per listener batch, carrying its
    # events as a list, at most the destination's `batch_size` (see `outbox.py`); the others
    # one row per event.
    packs: bool = False

    @property
    def model(self) -> type[Model]:
        return apps.get_model(self.model_label)


KINDS: dict[str, Kind] = {
    kind.key: kind
    for kind in (
        Kind(
            "webhook",
            "Webhook",
            "forwarding.WebhookDestination",
            "apps.forwarding.webhook.transport.WebhookTransport",
        ),
        Kind(
            "database",
            "Database",
            "forwarding.DatabaseDestination",
            "apps.forwarding.database.transport.DatabaseTransport",
            rate_scale=10,
            packs=True,
        ),
    )
}


_transports: dict[str, Transport] = {}


def transport(key: str) -> Transport:
    """The process's transport for a kind (it owns connection pools: one per process)."""
    found = _transports.get(key)
    if found is None:
        found = _transports[key] = import_string(KINDS[key].transport_path)()
    return found


def close_transports() -> None:
    from . import pump

    for found in _transports.values():
        found.close()
    _transports.clear()
    pump.close()
