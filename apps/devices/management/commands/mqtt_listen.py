"""`manage.py mqtt_listen`: the ingest process. Run N copies with MQTT_SHARED_GROUP set."""

from __future__ import annotations

import signal

from django.core.management.base import BaseCommand, CommandError

from apps.core import gctune
from apps.devices.listener import Listener


class Command(BaseCommand):
    help = "Subscribe to every device profile's topics and ingest messages in batches."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--url", help="Broker URL (default: MQTT_URL)")
        parser.add_argument(
            "--group", help="Shared-subscription group (default: MQTT_SHARED_GROUP)"
        )
        parser.add_argument("--client-id", help="MQTT client id; must be unique per copy")
        parser.add_argument("--batch-size", type=int, help="Messages per transaction")
        parser.add_argument("--batch-ms", type=int, help="Longest wait to fill a batch")
        parser.add_argument("--no-live", action="store_true", help="Do not push to live pages")
        parser.add_argument(
            "--retire",
            action="store_true",
            help="Retire the copy with this --client-id from the shared subscription: ingest "
            "what the broker queued for it, end its session and exit (scaling down)",
        )

    def handle(self, *args, **options) -> None:
        publisher = None
        if not options["no_live"]:
            try:
                from apps.devices.live import BatchPublisher
            except ImportError:  # live pages not installed in this build
                BatchPublisher = None  # noqa: N806
            if BatchPublisher is not None:
                publisher = BatchPublisher()
        listener = Listener(
            url=options["url"],
            group=options["group"],
            client_id=options["client_id"],
            batch_size=options["batch_size"],
            batch_ms=options["batch_ms"],
            publisher=publisher,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: listener.stop())
        gctune.tune()
        if not options["retire"]:
            listener.run()
            return
        if not listener.retire():
            raise CommandError(
                f"{listener.client_id} not retired: its queue was not drained (stopped, or "
                "still flowing at the time limit). Its session is kept; run --retire again."
            )
        self.stdout.write(
            f"Retired {listener.client_id}: {listener.stats.stored} messages stored from its "
            "queue, session ended."
        )
