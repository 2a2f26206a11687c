import os

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_shutting_down

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


# --- stopping a worker: delivery drains finish what is in flight, then end ---------------------
# A warm shutdown (SIGTERM to the main process, as `docker stop` sends) asks the drains running
# in this worker to stop, through a flag in memory the pool's children share with the main
# process (see `apps.forwarding.tasks`).


@worker_init.connect
def _prepare_stop(**_kwargs) -> None:
    from apps.forwarding import tasks

    tasks.worker_starting()


@worker_shutting_down.connect
def _stop_drains(how=None, **_kwargs) -> None:
    if how == "Warm":  # a cold shutdown kills running tasks anyway
        from apps.forwarding import tasks

        tasks.stop_drains()
