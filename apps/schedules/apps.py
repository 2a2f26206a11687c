from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "apps.schedules"
    label = "schedules"

    def ready(self) -> None:
        from apps.core import retention

        from .models import RunStatus, ScheduleRun

        # Walks the (status, planned_at) index, one status at a time.
        retention.register(
            retention.Policy(
                "schedule runs", ScheduleRun, "planned_at", "HISTORY_RETENTION_DAYS", "status",
                lambda: RunStatus.values,
            )
        )  # fmt: skip
