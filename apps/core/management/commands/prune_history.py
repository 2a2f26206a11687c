"""Delete history past its retention now (beat does it hourly), or count it first.

    manage.py prune_history [--dry-run] [--table telemetry] [--seconds 600]

The retention of each table is a setting (docs/configuration.md); see apps.core.retention.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.core import retention


class Command(BaseCommand):
    help = "Delete telemetry, quarantined messages and other history past its retention."

    def add_arguments(self, parser: CommandParser) -> None:
        labels = [p.label for p in retention.policies()]
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
        parser.add_argument(
            "--table",
            action="append",
            choices=labels,
            help="only this table (repeatable); default: all",
        )
        parser.add_argument(
            "--seconds",
            type=float,
            default=retention.DEFAULT_SECONDS,
            help="stop after about this long; run again to go on (default %(default)s)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["seconds"] < 0:
            raise CommandError("--seconds must not be negative")
        result = retention.prune(
            seconds=options["seconds"], dry_run=options["dry_run"], only=options["table"]
        )
        verb = "would delete" if options["dry_run"] else "deleted"
        for policy in retention.policies():
            if options["table"] and policy.label not in options["table"]:
                continue
            days = policy.days
            if days <= 0:
                self.stdout.write(f"{policy.label}: kept forever ({policy.setting}=0)")
            elif policy.label in result.deleted:
                self.stdout.write(
                    f"{policy.label}: {verb} {result.deleted[policy.label]} rows "
                    f"older than {days} days"
                )
            else:
                self.stdout.write(f"{policy.label}: not reached (time budget spent)")
        if not result.complete:
            self.stdout.write("Stopped after the time budget: run again to go on.")
