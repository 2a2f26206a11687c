from django.apps import AppConfig
from django.conf import settings


class ForwardingConfig(AppConfig):
    name = "apps.forwarding"
    label = "forwarding"
    verbose_name = "Data delivery"

    def ready(self) -> None:
        from iotplatform.celery import app

        # The short periodic sweep that finds due retries and lost leases. Beat's
        # DatabaseScheduler copies this entry into its table on start, with the interval
        # from the settings of the process that runs beat.
        app.add_periodic_task(
            settings.DELIVERY_SWEEP_SECONDS,
            app.signature("forwarding.sweep"),
            name="forwarding.sweep",
            queue=settings.DELIVERY_QUEUE,
        )
