from django.apps import AppConfig
from django.conf import settings


class DevicesConfig(AppConfig):
    name = "apps.devices"
    label = "devices"

    def ready(self) -> None:
        from iotplatform.celery import app

        from . import credentials  # noqa: F401 - connects its signal receivers
        from .retention import register_tables

        register_tables()  # history pruned by apps.core.retention

        if settings.BROKER_PRUNE_MINUTES > 0:
            # Copied into beat's table on start, with the interval of the process running beat.
            app.add_periodic_task(
                settings.BROKER_PRUNE_MINUTES * 60,
                app.signature("devices.prune_logins"),
                name="devices.prune_logins",
            )
