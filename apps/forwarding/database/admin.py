"""Admin for database destinations: connection, mapping (with the CREATE TABLE that fits it),
Test Connection with its findings, and the per-batch log.

The password is write-only (an empty password input: "set — leave blank to keep"). The mapping
is edited as text, one `column = ${path}` per line. The platform runs the suggested CREATE TABLE
only when the owner ticks "Create the table now" on that save.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from unfold.admin import TabularInline
from unfold.decorators import display

from apps.owners.admin_mixins import OwnerScopedAdminMixin

from .. import stats
from ..destination_admin import DestinationAdmin, DestinationForm
from ..models import EVENT_TYPE_CHOICES
from . import actions, ddl, identifiers, mapping
from .models import BatchOutcome, DatabaseBatch, DatabaseDestination

BATCHES_INLINE = 20
BATCH_LABELS = {
    BatchOutcome.WRITTEN.label: "success",
    BatchOutcome.PARTIAL.label: "warning",
    BatchOutcome.RETRY.label: "warning",
    BatchOutcome.ERROR.label: "danger",
}


class MappingField(forms.CharField):
    """The column mapping as text, one `column = ${path}` per line; a list of pairs in Python."""

    widget = forms.Textarea(attrs={"rows": 8, "spellcheck": "false", "class": "font-mono"})

    def prepare_value(self, value: Any) -> Any:
        return mapping.as_text(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[list[str]]:
        if isinstance(value, list):
            return value
        return mapping.parse(super().to_python(value))


class KeyColumnsField(forms.CharField):
    """Comma-separated column names; a list in Python."""

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list):
            return value
        names = [n.strip() for n in (super().to_python(value) or "").split(",") if n.strip()]
        try:
            return identifiers.check_all(names, "key column")
        except ValidationError as exc:
            raise ValidationError(exc.messages) from None


class DatabaseDestinationForm(DestinationForm):
    event_types = forms.MultipleChoiceField(
        choices=EVENT_TYPE_CHOICES,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Leave all unticked to receive every event type.",
    )
    column_mapping = MappingField(
        label="Column mapping",
        help_text="One column per line: column = ${path}, e.g. power = ${data.power}. Paths: "
        "${id} ${type} ${ts} ${received_at} ${seq} ${device.id} ${device.name} "
        "${device.profile} ${data} ${data.<field>}; text without ${…} is a constant.",
    )
    key_columns = KeyColumnsField(
        label="Key columns",
        required=False,
        help_text="Upsert only: comma-separated, the table's primary key or a unique index "
        "(event_id makes replays idempotent).",
    )
    create_table = forms.BooleanField(
        label="Create the table now",
        required=False,
        help_text="Runs the CREATE TABLE shown above in your database when you save (needs an "
        "account with CREATE rights; nothing is created unless this is ticked).",
    )

    class Meta:
        model = DatabaseDestination
        fields = (
            "owner",
            "name",
            "enabled",
            "engine",
            "host",
            "port",
            "database_name",
            "schema",
            "username",
            "password",
            "tls_mode",
            "table",
            "column_mapping",
            "write_mode",
            "key_columns",
            "batch_size",
            "flush_interval_ms",
            "event_types",
            "devices",
            "max_attempts",
            "initial_delay",
            "backoff_factor",
            "max_delay",
            "rate_limit",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        password = self.fields.get("password")
        if password is not None:
            password.help_text = "Stored encrypted; leave blank to keep the current one."


class RecentBatchesFormSet(forms.BaseInlineFormSet):
    def get_queryset(self) -> Any:
        if not hasattr(self, "_recent"):
            self._recent = list(super().get_queryset().order_by("-id")[:BATCHES_INLINE])
        return self._recent


class DatabaseBatchInline(OwnerScopedAdminMixin, TabularInline):
    """The per-batch log: newest batches first."""

    model = DatabaseBatch
    formset = RecentBatchesFormSet
    fields = readonly_fields = (
        "started_at",
        "result",
        "rows",
        "written",
        "rejected",
        "retried",
        "statements",
        "duration_ms",
        "error",
    )
    verbose_name_plural = "recent batches"
    extra = 0
    max_num = 0
    can_delete = False
    tab = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @display(description="Outcome", label=BATCH_LABELS)
    def result(self, obj: DatabaseBatch) -> str:
        return obj.get_outcome_display()


def state_of(obj: DatabaseDestination) -> str:
    if not obj.enabled:
        return "Disabled"
    if obj.error_reason:
        return "In error"
    if obj.failure_streak or obj.failing_since:
        return "Failing"
    return "Enabled"


STATE_LABELS = {
    "Enabled": "success",
    "Failing": "warning",
    "In error": "danger",
    "Disabled": "danger",
}


@admin.register(DatabaseDestination)
class DatabaseDestinationAdmin(DestinationAdmin):
    form = DatabaseDestinationForm
    inlines = [DatabaseBatchInline]
    backlog_verb = "written"
    list_display = (
        "name",
        "owner",
        "target",
        "state",
        "rows_written",
        "success",
        "last_success_at",
        "last_error",
        "test_result",
    )
    list_filter = ("enabled", "engine", "owner")
    search_fields = ("name", "host", "database_name", "table")
    filter_horizontal = ("devices",)
    actions = ["test_selected", "enable_selected", "disable_selected"]
    readonly_fields = ("monitoring", "test_result", "test_findings", "create_table_sql")
    change_form_before_template = "forwarding/database_tools.html"
    fieldsets = (
        (None, {"fields": ("owner", "name", "enabled")}),
        ("Monitoring", {"fields": ("monitoring", "test_result", "test_findings")}),
        (
            "Connection",
            {
                "fields": (
                    "engine",
                    "host",
                    "port",
                    "database_name",
                    "schema",
                    "username",
                    "password",
                    "tls_mode",
                )
            },
        ),
        (
            "Table",
            {
                "fields": (
                    "table",
                    "column_mapping",
                    "write_mode",
                    "key_columns",
                    "create_table_sql",
                    "create_table",
                )
            },
        ),
        ("What to send", {"fields": ("event_types", "devices")}),
        (
            "Batches, retries and limits",
            {
                "fields": (
                    "batch_size",
                    "flush_interval_ms",
                    "max_attempts",
                    "initial_delay",
                    "backoff_factor",
                    "max_delay",
                    "rate_limit",
                )
            },
        ),
    )

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.inlines if obj is not None else ()

    # --- display ----------------------------------------------------------------------------

    @display(description="Table")
    def target(self, obj: DatabaseDestination) -> str:
        return f"{obj.get_engine_display()} {obj.host}/{obj.database_name}.{obj.table}"

    @display(description="State", label=STATE_LABELS)
    def state(self, obj: DatabaseDestination) -> str:
        return state_of(obj)

    @display(description="Rows written", ordering="delivered_count")
    def rows_written(self, obj: DatabaseDestination) -> str:
        return f"{obj.delivered_count} in {obj.batch_count} batches"

    @display(description="Test findings")
    def test_findings(self, obj: DatabaseDestination) -> str:
        report = obj.test_report or {}
        items = [
            *(("text-red-700", "Error", m) for m in report.get("errors", [])),
            *(("text-amber-600", "Warning", m) for m in report.get("warnings", [])),
            *(("text-green-700", "OK", m) for m in report.get("notes", [])),
        ]
        if not items:
            return "–"
        return format_html(
            '<ul class="flex flex-col gap-1">{}</ul>',
            format_html_join("", '<li><span class="{}">{}</span>: {}</li>', items),
        )

    @display(description="CREATE TABLE for this mapping")
    def create_table_sql(self, obj: DatabaseDestination | None) -> str:
        if obj is None or obj.pk is None:
            obj = DatabaseDestination(engine="postgres", table="readings")
        try:
            statement = ddl.suggest(obj)
        except (ValidationError, ValueError):
            return "Fix the table name and mapping to see it."
        return format_html('<pre class="text-xs whitespace-pre-wrap">{}</pre>', statement)

    @display(description="Figures")
    def monitoring(self, obj: DatabaseDestination | None) -> str:
        if obj is None or obj.pk is None:
            return "–"
        figures = stats.figures([obj])[obj.pk]
        rate = obj.success_rate
        return format_html(
            "Rows written {} in {} batches · dead letters {} · retries {} · success rate {}<br>"
            "Last sync {} · backlog {} ({} being written) · batch time p50 {} ms, p95 {} ms<br>"
            "Last error: {}{}",
            obj.delivered_count,
            obj.batch_count,
            obj.failed_count,
            obj.retried_count,
            "–" if rate is None else f"{rate:.1%}",
            f"{obj.last_success_at:%Y-%m-%d %H:%M:%S} UTC" if obj.last_success_at else "never",
            figures.backlog,
            figures.sending,
            figures.p50_ms if figures.p50_ms is not None else "–",
            figures.p95_ms if figures.p95_ms is not None else "–",
            obj.last_error or "none",
            f" — in error: {obj.error_reason}" if obj.error_reason else "",
        )

    # --- saving -----------------------------------------------------------------------------

    def saved(self, request: HttpRequest, obj: DatabaseDestination, form: Any) -> None:
        if form.cleaned_data.get("create_table"):
            done, message = actions.create_table(obj)
            self.message_user(request, message, messages.SUCCESS if done else messages.ERROR)

    def changed(self, obj: DatabaseDestination) -> None:
        actions.destination_changed(obj)

    # --- list actions (views: DestinationAdmin) ---------------------------------------------

    @admin.action(description="Test Connection", permissions=["operate"])
    def test_selected(self, request: HttpRequest, queryset: QuerySet[DatabaseDestination]) -> None:
        self.test_each(request, queryset)

    @admin.action(description="Enable (and write their backlog)", permissions=["change"])
    def enable_selected(
        self, request: HttpRequest, queryset: QuerySet[DatabaseDestination]
    ) -> None:
        self.enable_each(request, queryset)

    @admin.action(description="Disable", permissions=["change"])
    def disable_selected(
        self, request: HttpRequest, queryset: QuerySet[DatabaseDestination]
    ) -> None:
        self.disable_each(request, queryset)


def recent_batches(owner_id: int, limit: int = 20) -> list[DatabaseBatch]:
    """The owner's newest batches, for the Data Delivery tab (the caller scoped the owner)."""
    return list(
        DatabaseBatch.objects.filter(owner_id=owner_id)
        .select_related("destination")
        .order_by("-id")[:limit]
    )
