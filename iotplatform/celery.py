import os

from celery import Celery
from celery.signals import worker_init, worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iotplatform.settings")

app = Celery("iotplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect  # the main process (where the threads pool runs tasks), before forking
@worker_process_init.connect  # each prefork child
def _tune_gc(**_kwargs) -> None:
    # Worker processes run long delivery drains: see apps.core.gctune.
    from apps.core import gctune

    gctune.tune()
