"""Beat entries for the schedule runner and the command sweep (django-celery-beat's scheduler).

Intervals are in the database so operators can change them in the admin; the tasks read their
own budgets from settings.
"""

from django.db import migrations
from django.utils import timezone

TASKS = [
    # (name, task, every seconds, expires seconds)
    ("Run due schedules", "schedules.run_due", 2, 4),
    ("Command deadlines and held commands", "commands.sweep", 5, 10),
]


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTasks = apps.get_model("django_celery_beat", "PeriodicTasks")
    for name, task, every, expires in TASKS:
        interval, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
        PeriodicTask.objects.update_or_create(
            name=name,
            defaults={"task": task, "interval": interval, "expire_seconds": expires,
                      "enabled": True},
        )
    # Tell a running beat that its schedule changed (update_or_create bypasses the signal).
    PeriodicTasks.objects.update_or_create(ident=1, defaults={"last_update": timezone.now()})


def remove(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[name for name, *_ in TASKS]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("schedules", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
