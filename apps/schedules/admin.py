"""Schedules in the admin: the schedule form with a live preview of the next runs, device
groups, the run history, and the Schedules tab of the IoT Owners page. Every class is
owner-scoped (apps.owners.admin_mixins)."""

from __future__ import annotations

from datetime import date
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST
from unfold.admin import ModelAdmin, TabularInline
from unfold.decorators import display
from unfold.forms import PaginationInlineFormSet

from apps.devices.admin import COMMAND_LABELS
from apps.owners.admin_mixins import OwnerScopedAdminMixin, OwnerScopedAutocompleteFilter
from apps.owners.admin_tabs import OwnerTab, register_owner_tab
from apps.owners.models import Role
from apps.owners.scoping import owners_for

from . import actions, cron
from .models import DeviceGroup, RunStatus, Schedule, ScheduleRun
from .views import owner_schedules_context, preview_rows

RUN_LABELS = {
    RunStatus.PUBLISHED: "success",
    RunStatus.CLAIMED: "info",
    RunStatus.HELD: "warning",
    RunStatus.MISSED: "warning",
    RunStatus.FAILED: "danger",
}
RECENT_RUNS = 20


class ScheduleForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = (
            "owner",
            "name",
            "device",
            "group",
            "action",
            "relay",
            "cron",
            "timezone",
            "enabled",
            "starts_on",
            "ends_on",
        )
        widgets = {
            "cron": forms.TextInput(attrs={"placeholder": "30 18 * * 1-5", "spellcheck": "false"}),
            "timezone": forms.TextInput(attrs={"list": "iana-zones", "autocomplete": "off"}),
        }


class RecentRunsFormSet(PaginationInlineFormSet):
    def get_queryset(self) -> Any:
        if not hasattr(self, "_recent"):
            self._recent = list(
                super().get_queryset().select_related("device", "command")[:RECENT_RUNS]
            )
        return self._recent


class RecentRunInline(OwnerScopedAdminMixin, TabularInline):
    model = ScheduleRun
    formset = RecentRunsFormSet
    fields = readonly_fields = (
        "planned_at",
        "device",
        "run_status",
        "executed_at",
        "lateness_text",
        "command_status",
    )
    verbose_name_plural = "recent runs"
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

    @display(description="Status", label=RUN_LABELS)
    def run_status(self, obj: ScheduleRun) -> tuple[str, str]:
        return obj.status, obj.get_status_display()

    @display(description="Late by")
    def lateness_text(self, obj: ScheduleRun) -> str:
        return lateness_text(obj)

    @display(description="Command", label=COMMAND_LABELS)
    def command_status(self, obj: ScheduleRun) -> tuple[str, str] | str:
        if obj.command is None:
            return obj.detail or "–"
        return obj.command.status, obj.command.get_status_display()


def lateness_text(run: ScheduleRun) -> str:
    late = run.lateness
    if late is None:
        return "–"
    seconds = late.total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.0f} s"


@admin.register(Schedule)
class ScheduleAdmin(OwnerScopedAdminMixin, ModelAdmin):
    form = ScheduleForm
    list_display = (
        "name",
        "owner",
        "target",
        "action_text",
        "cron",
        "timezone",
        "enabled_badge",
        "next_run_local",
        "last_run_at",
    )
    list_filter = ("enabled", "action", ("device", OwnerScopedAutocompleteFilter), "owner")
    list_select_related = ("owner", "device", "group")
    search_fields = ("name", "cron", "device__device_id", "group__name")
    readonly_fields = ("next_runs_preview", "next_run_at", "last_run_at")
    inlines = (RecentRunInline,)
    actions = ("enable_selected", "disable_selected")
    change_form_after_template = "schedules/_zone_datalist.html"
    fieldsets = (
        (None, {"fields": ("owner", "name", "enabled")}),
        ("What", {"fields": ("device", "group", "action", "relay")}),
        ("When", {"fields": ("cron", "timezone", "starts_on", "ends_on", "next_runs_preview")}),
        ("State", {"fields": ("next_run_at", "last_run_at")}),
    )

    class Media:
        js = ("schedules/preview.js",)

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.inlines if obj is not None else ()

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        initial = super().get_changeform_initial_data(request)
        mine = owners_for(request.user, Role.ADMIN)
        requested = str(initial.get("owner", ""))
        owner = mine.filter(pk=int(requested)).first() if requested.isdigit() else None
        owner = owner or mine.first()
        initial.setdefault("timezone", owner.timezone if owner else "UTC")
        return initial

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra_context = {**(extra_context or {}), "zone_names": cron.zone_names()}
        return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: Schedule, form: Any, change: bool) -> None:
        actions.save_schedule(obj, user=request.user)

    def get_urls(self) -> list:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "preview/",
                self.admin_site.admin_view(self.preview_view),
                name=f"{info[0]}_{info[1]}_preview",
            ),
            path(
                "<path:object_id>/enabled/",
                self.admin_site.admin_view(require_POST(self.enabled_view)),
                name=f"{info[0]}_{info[1]}_enabled",
            ),
            *super().get_urls(),
        ]

    # --- the preview: an HTML fragment fetched by static/schedules/preview.js -----------------

    def preview_view(self, request: HttpRequest) -> HttpResponse:
        rows, errors, zone = preview_rows(
            request.GET.get("cron", ""),
            request.GET.get("timezone", ""),
            _date(request.GET.get("starts_on")),
            _date(request.GET.get("ends_on")),
        )
        return render(
            request,
            "schedules/_preview.html",
            {"rows": rows, "errors": errors, "zone": zone, "now": timezone.now()},
        )

    @display(description="Next 10 runs")
    def next_runs_preview(self, obj: Schedule | None) -> str:
        from django.template.loader import render_to_string

        rows, errors, zone = ([], [], None)
        if obj is not None and obj.pk:
            rows, errors, zone = preview_rows(obj.cron, obj.timezone, obj.starts_on, obj.ends_on)
        return render_to_string(
            "schedules/_preview_box.html",
            {
                "url": reverse("admin:schedules_schedule_preview"),
                "rows": rows,
                "errors": errors,
                "zone": zone,
            },
        )

    # --- enable / disable ---------------------------------------------------------------------

    def enabled_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        schedule = self.get_object(request, object_id)  # scoped: another owner's is a 404
        if schedule is None:
            raise Http404("No such schedule")
        try:
            actions.set_enabled(schedule, request.POST.get("enabled") == "1", user=request.user)
        except actions.NotAllowed as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            state = "enabled" if schedule.enabled else "disabled"
            self.message_user(request, f"“{schedule}” {state}.", messages.SUCCESS)
        back = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
            back = reverse("admin:schedules_schedule_change", args=[schedule.pk])
        return HttpResponseRedirect(back)

    @admin.action(description="Enable selected schedules", permissions=["operate"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected schedules", permissions=["operate"])
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request: HttpRequest, queryset: QuerySet, enabled: bool) -> None:
        done = refused = 0
        for schedule in queryset:
            try:
                actions.set_enabled(schedule, enabled, user=request.user)
                done += 1
            except actions.NotAllowed:
                refused += 1
        state = "enabled" if enabled else "disabled"
        self.message_user(request, f"{done} schedule(s) {state}.", messages.SUCCESS)
        if refused:
            self.message_user(
                request,
                f"{refused} schedule(s) of owners where you are not an operator were "
                "left unchanged.",
                messages.WARNING,
            )

    # --- columns ------------------------------------------------------------------------------

    @display(description="Target")
    def target(self, obj: Schedule) -> str:
        return obj.target_label

    @display(description="Action", ordering="action")
    def action_text(self, obj: Schedule) -> str:
        return f"{obj.action} (relay {obj.relay})" if obj.relay else obj.action

    @display(description="Enabled", ordering="enabled", label={"yes": "success", "no": "danger"})
    def enabled_badge(self, obj: Schedule) -> tuple[str, str]:
        return ("yes", "Enabled") if obj.enabled else ("no", "Disabled")

    @display(description="Next run (local)", ordering="next_run_at")
    def next_run_local(self, obj: Schedule) -> str:
        if not obj.next_run_at:
            return "–"
        try:
            local = obj.next_run_at.astimezone(obj.zone())
        except cron.CronError:
            return obj.next_run_at.isoformat()
        return f"{local:%Y-%m-%d %H:%M %Z}"


def _date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


class DeviceGroupForm(forms.ModelForm):
    class Meta:
        model = DeviceGroup
        fields = ("owner", "name", "devices")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        owner, devices = data.get("owner"), data.get("devices")
        if owner and devices:
            foreign = [str(d) for d in devices if d.owner_id != owner.pk]
            if foreign:
                self.add_error("devices", f"Not devices of {owner}: {', '.join(foreign)}.")
        return data


@admin.register(DeviceGroup)
class DeviceGroupAdmin(OwnerScopedAdminMixin, ModelAdmin):
    form = DeviceGroupForm
    list_display = ("name", "owner", "device_count")
    list_filter = ("owner",)
    search_fields = ("name",)
    filter_horizontal = ("devices",)

    @display(description="Devices")
    def device_count(self, obj: DeviceGroup) -> int:
        return obj.devices.count()


@admin.register(ScheduleRun)
class ScheduleRunAdmin(OwnerScopedAdminMixin, ModelAdmin):
    """Every run: planned and executed time, status, and the command it issued. Read-only."""

    list_display = (
        "planned_at",
        "schedule",
        "device",
        "run_status",
        "executed_at",
        "lateness",
        "command_status",
        "detail",
    )
    list_filter = ("status", ("device", OwnerScopedAutocompleteFilter), "owner")
    list_select_related = ("schedule", "device", "command")
    search_fields = ("schedule__name", "=device__device_id")
    date_hierarchy = "planned_at"
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @display(description="Status", ordering="status", label=RUN_LABELS)
    def run_status(self, obj: ScheduleRun) -> tuple[str, str]:
        return obj.status, obj.get_status_display()

    @display(description="Late by")
    def lateness(self, obj: ScheduleRun) -> str:
        return lateness_text(obj)

    @display(description="Command", label=COMMAND_LABELS)
    def command_status(self, obj: ScheduleRun) -> tuple[str, str] | str:
        if obj.command is None:
            return "–"
        return obj.command.status, obj.command.get_status_display()


register_owner_tab(
    OwnerTab(
        key="schedules",
        title="Schedules",
        order=40,
        template="schedules/owner_tab.html",
        context=owner_schedules_context,
    )
)
