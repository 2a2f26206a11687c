"""Replay deliveries: one, a selection, or a time range — same webhook-id, a new attempt.

    manage.py replay_deliveries --owner alice --id 812 --id 813
    manage.py replay_deliveries --owner alice --destination 4 --since 2025-01-01T00:00Z \
        --until 2025-01-02T00:00Z [--include-delivered] [--dry-run]

Named ids are replayed whether they failed or were delivered; ranges replay only dead letters
unless --include-delivered. The owner is
required: a replay never reaches past one tenant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from apps.forwarding import actions
from apps.forwarding.models import Delivery, Status
from apps.owners.models import Owner


def _when(value: str) -> datetime:
    parsed = parse_datetime(value.replace("Z", "+00:00"))
    if parsed is None:
        raise CommandError(f"not an ISO 8601 date-time: {value!r}")
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed, UTC)


class Command(BaseCommand):
    help = "Replay dead-letter (or delivered) deliveries of one owner."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--owner", required=True, help="owner slug")
        parser.add_argument("--id", type=int, action="append", default=[], help="delivery id")
        parser.add_argument("--destination", type=int, help="only this destination id")
        parser.add_argument("--since", type=_when, help="created at or after (ISO 8601)")
        parser.add_argument("--until", type=_when, help="created before (ISO 8601)")
        parser.add_argument("--include-delivered", action="store_true")
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        owner = Owner.objects.filter(slug=options["owner"]).first()
        if owner is None:
            raise CommandError(f"no owner with slug {options['owner']!r}")
        if not (options["id"] or options["destination"] or options["since"] or options["until"]):
            raise CommandError("say what to replay: --id, --destination, --since or --until")
        deliveries = Delivery.objects.filter(owner=owner)
        if options["id"]:
            deliveries = deliveries.filter(id__in=options["id"])
        if options["destination"]:
            deliveries = deliveries.filter(destination_id=options["destination"])
        # Named ids are replayed whatever their outcome; ranges take dead letters only,
        # unless told otherwise (re-sending a day of delivered data is a deliberate act).
        both = [Status.FAILED, Status.DELIVERED]
        statuses = both if options["include_delivered"] or options["id"] else [Status.FAILED]
        if options["since"]:
            deliveries = deliveries.filter(created_at__gte=options["since"])
        if options["until"]:
            deliveries = deliveries.filter(created_at__lt=options["until"])
        deliveries = deliveries.filter(status__in=statuses)
        if options["dry_run"]:
            # Events, as the replay counts them (a database destination's row carries several).
            self.stdout.write(f"would replay {deliveries.events()} deliveries of {owner.slug}")
            return
        count = actions.replay_deliveries(deliveries)
        self.stdout.write(self.style.SUCCESS(f"replaying {count} deliveries of {owner.slug}"))
