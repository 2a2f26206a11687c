from django.apps import AppConfig
from django.conf import settings


class CoreConfig(AppConfig):
    name = "apps.core"
    label = "core"

    def ready(self) -> None:
        from iotplatform.celery import app

        if settings.RETENTION_PRUNE_MINUTES > 0:
            # History past its retention (apps.core.retention); the tables register themselves
            # in their apps' ready(). Copied into beat's table on start.
            app.add_periodic_task(
                settings.RETENTION_PRUNE_MINUTES * 60,
                app.signature("core.prune_history"),
                name="core.prune_history",
            )
