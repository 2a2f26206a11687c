"""Devices in the admin: the fleet list, device pages with recent history, and the read-only
logs (telemetry, transitions, commands, quarantine). Every class is owner-scoped."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.db.models import Count
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.timesince import timesince
from unfold.admin import ModelAdmin, TabularInline
from unfold.decorators import display
from unfold.forms import PaginationInlineFormSet

from apps.owners.admin_mixins import OwnerScopedAdminMixin, OwnerScopedAutocompleteFilter
from apps.owners.admin_tabs import OwnerTab, register_owner_tab
from apps.owners.models import Owner

from .admin_credentials import (
    BrokerLoginAdminMixin,
    SyncOnSaveAdminMixin,
    issue_or_rotate,
    revoke_credentials,
)
from .models import (
    Command,
    CommandStatus,
    Connection,
    Device,
    DeviceCredential,
    QuarantinedMessage,
    QuarantineReason,
    Telemetry,
    Transition,
)

CONNECTION_LABELS = {
    Connection.ONLINE: "success",
    Connection.OFFLINE: "danger",
    Connection.UNKNOWN: "info",
}
COMMAND_LABELS = {
    CommandStatus.CONFIRMED: "success",
    CommandStatus.PUBLISHED: "info",
    CommandStatus.PENDING: "info",
    CommandStatus.QUEUED: "warning",
    CommandStatus.UNCONFIRMED: "warning",
    CommandStatus.EXPIRED: "danger",
    CommandStatus.FAILED: "danger",
}
# Rows in a device page's history tabs and in the owner page's device table.
RECENT_ROWS = 20
OWNER_TAB_DEVICES = 100


# --- small renderers shared by lists, detail pages and the owner tab ----------------------------


def badge(text: str, variant: str = "") -> SafeString:
    """unfold's label markup (its stylesheet only has the classes its own templates use)."""
    return render_to_string("unfold/helpers/label.html", {"text": text, "type": variant})


def power_badges(device: Device) -> SafeString:
    """One badge per relay ("ON", or "2 OFF" on multi-relay devices); "?" when never reported."""
    badges = []
    for relay in device.relays():
        state = str(device.power.get(str(relay), "?"))
        text = state if device.relay_count == 1 else f"{relay} {state}"
        badges.append(badge(text, "success" if state == "ON" else ""))
    return mark_safe(" ".join(badges))  # noqa: S308 - each part escaped by the template


def ago(moment: Any) -> str:
    if moment is None:
        return "never"
    return format_html(
        '<span title="{}">{} ago</span>',
        timezone.localtime(moment).isoformat(timespec="seconds"),
        timesince(moment, depth=1),
    )


def json_summary(data: Any, limit: int = 120) -> str:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_block(data: Any) -> str:
    return format_html(
        '<pre style="white-space: pre-wrap; font-family: monospace;">{}</pre>',
        json.dumps(data, indent=2, ensure_ascii=False, default=str),
    )


def live_page_url(device: Device) -> str:
    return reverse("device-detail", args=[device.device_id])


# --- device page history: capped, read-only inlines ---------------------------------------------


class RecentRowsFormSet(PaginationInlineFormSet):
    """Only the newest rows: history tables grow without bound and a formset loads every row."""

    def get_queryset(self) -> Any:
        if not hasattr(self, "_recent"):
            # A list, not a sliced queryset: formsets filter their queryset again later.
            self._recent = list(super().get_queryset()[:RECENT_ROWS])
        return self._recent


class RecentHistoryInline(OwnerScopedAdminMixin, TabularInline):
    formset = RecentRowsFormSet
    extra = 0
    max_num = 0
    can_delete = False
    hide_title = True  # the rows' own str() above each row repeats what the columns say
    tab = True
    template_after = "admin/devices/recent_rows_footer.html"
    changelist_url_name = ""  # the full list, filtered to this device, linked under the rows

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class RecentTransitionInline(RecentHistoryInline):
    model = Transition
    fields = readonly_fields = ("at", "kind", "relay", "old", "new", "cause")
    verbose_name_plural = "recent transitions"
    changelist_url_name = "admin:devices_transition_changelist"


class RecentTelemetryInline(RecentHistoryInline):
    model = Telemetry
    fields = readonly_fields = ("time", "kind", "seq", "summary", "received_at")
    verbose_name_plural = "recent telemetry"
    changelist_url_name = "admin:devices_telemetry_changelist"

    @display(description="Time")
    def time(self, obj: Telemetry) -> Any:
        return obj.ts

    @display(description="Data")
    def summary(self, obj: Telemetry) -> str:
        return json_summary(obj.data)


class RecentCommandInline(RecentHistoryInline):
    model = Command
    fields = readonly_fields = ("issued_at", "action", "relay", "status_badge", "issuer_label")
    verbose_name_plural = "recent commands"
    changelist_url_name = "admin:devices_command_changelist"

    @display(description="Status", label=COMMAND_LABELS)
    def status_badge(self, obj: Command) -> tuple[str, str]:
        return obj.status, obj.get_status_display()


# --- devices --------------------------------------------------------------------------------------

STATE_FIELDS = (
    "connection_state",
    "power_badges",
    "last_seen",
    "connection_changed_at",
    "firmware",
    "device_type",
    "ip_address",
    "rssi",
    "uptime",
    "last_reading_block",
    "last_reading_at",
)
SEQUENCE_FIELDS = ("boot_id", "last_seq", "seq_gaps", "seq_missing", "seq_duplicates")


@admin.register(Device)
class DeviceAdmin(BrokerLoginAdminMixin, OwnerScopedAdminMixin, ModelAdmin):
    list_display = (
        "device",
        "owner",
        "profile",
        "connection_badge",
        "power_badges",
        "last_seen",
        "firmware",
        "live_link",
    )
    list_filter = ("owner", "profile", "connection")
    search_fields = ("device_id", "name", "location", "topic")
    list_select_related = ("owner",)
    inlines = (RecentTransitionInline, RecentTelemetryInline, RecentCommandInline)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> list:
        config = (
            "Device",
            {"fields": ("owner", "device_id", "name", "location", "profile"), "classes": ["tab"]},
        )
        protocol = (
            "Protocol",
            {
                "fields": (
                    "topic",
                    "topic_order",
                    "relay_count",
                    "expected_interval",
                    "offline_policy",
                ),
                "classes": ["tab"],
            },
        )
        if obj is None:
            return [config, protocol]
        return [
            ("State", {"fields": STATE_FIELDS, "classes": ["tab"]}),
            config,
            protocol,
            ("Sequence (meter-v2)", {"fields": SEQUENCE_FIELDS, "classes": ["tab"]}),
        ]

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.inlines if obj is not None else ()  # a new device has no history

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        # The id and profile fix the device's topics; the owner is copied onto every history
        # row and binds its encrypted broker password, so none of them move after creation.
        return ("owner", "device_id", "profile", *STATE_FIELDS, *SEQUENCE_FIELDS)

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any):
        form = super().get_form(request, obj, change, **kwargs)
        if "topic" in form.base_fields:
            form.base_fields["topic"].required = False  # Device.save() defaults it to the id
            form.base_fields[
                "topic"
            ].help_text = "Blank: the device id. Tasmota: the device's own Topic setting."
        return form

    def view_on_site(self, obj: Device) -> str:
        return live_page_url(obj)

    @display(description="Device", ordering="device_id", header=True)
    def device(self, obj: Device) -> tuple[str, str]:
        return obj.name or obj.device_id, obj.device_id if obj.name else ""

    @display(description="Connection", ordering="connection", label=CONNECTION_LABELS)
    def connection_badge(self, obj: Device) -> tuple[str, str]:
        return obj.connection, obj.get_connection_display()

    @display(description="Connection")
    def connection_state(self, obj: Device) -> SafeString:
        # Read-only form fields do not apply `label=`: the badge is rendered here.
        return badge(obj.get_connection_display(), CONNECTION_LABELS.get(obj.connection, ""))

    @display(description="Power")
    def power_badges(self, obj: Device) -> SafeString:
        return power_badges(obj)

    @display(description="Last seen", ordering="last_seen_at")
    def last_seen(self, obj: Device) -> str:
        return ago(obj.last_seen_at)

    @display(description="Last reading")
    def last_reading_block(self, obj: Device) -> str:
        return json_block(obj.last_reading) if obj.last_reading else "–"

    @display(description="Live")
    def live_link(self, obj: Device) -> str:
        return format_html(
            '<a href="{}" class="text-primary-600 underline">Live page</a>', live_page_url(obj)
        )


def owner_devices_context(request: HttpRequest, owner: Owner) -> dict[str, Any]:
    # The owner page is reached through OwnerAdmin.get_object, so `owner` is already scoped.
    devices = Device.objects.filter(owner=owner).order_by("device_id")
    device_admin = admin.site._registry[Device]
    rows = [
        [
            format_html(
                '<a href="{}" class="text-primary-600">{}</a>',
                reverse("admin:devices_device_change", args=[device.pk]),
                device,
            ),
            device.device_id,
            device.get_profile_display(),
            badge(device.get_connection_display(), CONNECTION_LABELS.get(device.connection, "")),
            power_badges(device),
            ago(device.last_seen_at),
            device.firmware or "–",
        ]
        for device in devices[:OWNER_TAB_DEVICES]
    ]
    changelist = reverse("admin:devices_device_changelist")
    return {
        "table": {
            "headers": ["Device", "Id", "Profile", "Connection", "Power", "Last seen", "Firmware"],
            "rows": rows,
        },
        "total": devices.count(),
        "shown": len(rows),
        "changelist_url": f"{changelist}?owner__id__exact={owner.pk}",
        "add_url": f"{reverse('admin:devices_device_add')}?owner={owner.pk}"
        if device_admin.has_role(request, device_admin.change_role, owner)
        else "",
    }


register_owner_tab(
    OwnerTab(
        key="devices",
        title="Devices",
        order=20,
        template="admin/devices/owner_devices_tab.html",
        context=owner_devices_context,
    )
)


# --- read-only logs -------------------------------------------------------------------------------


class ReadOnlyLogAdmin(OwnerScopedAdminMixin, ModelAdmin):
    """Rows written by the listener and the command publisher: looked at, never edited here."""

    # Counting millions of rows on every page is the slowest part of a big changelist.
    show_full_result_count = False
    list_per_page = 50
    list_before_template = "admin/devices/log_retention.html"
    # The days setting these rows are pruned by (apps.core.retention), shown above the list.
    retention_setting = "HISTORY_RETENTION_DAYS"

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        days = int(getattr(settings, self.retention_setting))
        extra = {"retention_days": days if days > 0 else None, **(extra_context or {})}
        return super().changelist_view(request, extra)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Telemetry)
class TelemetryAdmin(ReadOnlyLogAdmin):
    retention_setting = "TELEMETRY_RETENTION_DAYS"
    list_display = ("time", "device", "owner", "kind", "seq", "summary", "received_at")
    list_filter = ("kind", ("device", OwnerScopedAutocompleteFilter), "owner")
    list_select_related = ("device", "owner")
    search_fields = ("=device__device_id", "topic")
    date_hierarchy = "ts"
    fields = ("device", "owner", "kind", "ts", "received_at", "seq", "topic", "data_block")
    readonly_fields = ("data_block",)

    @display(description="Time", ordering="ts")
    def time(self, obj: Telemetry) -> Any:
        return obj.ts

    @display(description="Data")
    def summary(self, obj: Telemetry) -> str:
        return json_summary(obj.data)

    @display(description="Data")
    def data_block(self, obj: Telemetry) -> str:
        return json_block(obj.data)


@admin.register(Transition)
class TransitionAdmin(ReadOnlyLogAdmin):
    list_display = ("at", "device", "owner", "kind", "relay", "change", "cause", "processed_at")
    list_filter = ("kind", "cause", ("device", OwnerScopedAutocompleteFilter), "owner")
    list_select_related = ("device", "owner")
    search_fields = ("=device__device_id",)
    date_hierarchy = "at"

    @display(description="Change")
    def change(self, obj: Transition) -> str:
        return f"{obj.old or '–'} → {obj.new}"


@admin.register(Command)
class CommandAdmin(ReadOnlyLogAdmin):
    list_display = (
        "issued_at",
        "device",
        "owner",
        "action",
        "relay",
        "status_badge",
        "issuer_label",
        "latency",
    )
    list_filter = ("status", "issuer_type", ("device", OwnerScopedAutocompleteFilter), "owner")
    list_select_related = ("device", "owner")
    search_fields = ("=device__device_id", "=request_id")
    date_hierarchy = "issued_at"

    @display(description="Status", ordering="status", label=COMMAND_LABELS)
    def status_badge(self, obj: Command) -> tuple[str, str]:
        return obj.status, obj.get_status_display()


@admin.register(QuarantinedMessage)
class QuarantinedMessageAdmin(ReadOnlyLogAdmin):
    """Members see refused messages that named one of their devices; operators see all."""

    list_display = ("received_at", "reason_badge", "topic", "detail", "size", "payload_short")
    list_filter = ("reason", "owner")
    search_fields = ("topic",)
    date_hierarchy = "received_at"
    list_select_related = ("device",)
    list_before_template = "admin/devices/quarantine_counts.html"
    retention_setting = "QUARANTINE_RETENTION_DAYS"
    fields = (
        "received_at",
        "reason",
        "detail",
        "topic",
        "size",
        "device",
        "owner",
        "payload_block",
    )
    readonly_fields = ("payload_block",)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser  # cleanup by operators

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        response = super().changelist_view(request, extra_context)
        if isinstance(response, TemplateResponse) and "cl" in (response.context_data or {}):
            cl = response.context_data["cl"]
            # Counts of the rows the list shows (scope and filters applied), largest first.
            counts = (
                cl.queryset.order_by().values_list("reason").annotate(n=Count("pk")).order_by("-n")
            )
            labels = dict(QuarantineReason.choices)
            response.context_data["reason_counts"] = [
                {"reason": reason, "label": labels.get(reason, reason), "count": n}
                for reason, n in counts
            ]
        return response

    @display(description="Reason", ordering="reason", label=True)
    def reason_badge(self, obj: QuarantinedMessage) -> str:
        return obj.get_reason_display()

    @display(description="Payload")
    def payload_short(self, obj: QuarantinedMessage) -> str:
        # Device bytes are attacker-controlled: always escaped (the admin autoescapes str).
        preview = obj.payload_preview
        return preview if len(preview) <= 80 else preview[:79] + "…"

    @display(description="Payload (first bytes)")
    def payload_block(self, obj: QuarantinedMessage) -> str:
        return format_html(
            '<pre style="white-space: pre-wrap; word-break: break-all; font-family: monospace;">'
            "{}</pre>",
            obj.payload_preview,
        )


@admin.register(DeviceCredential)
class DeviceCredentialAdmin(SyncOnSaveAdminMixin, OwnerScopedAdminMixin, ModelAdmin):
    """Broker logins. Members see that one exists; only operators change it (write-only)."""

    list_display = ("username", "device", "owner", "created_at", "revoked_at")
    list_filter = ("owner",)
    list_select_related = ("device", "owner")
    search_fields = ("username", "device__device_id")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # provisioning creates credentials (and puts them into the broker)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        fields = ["username", "device", "owner", "created_at", "revoked_at"]
        # Editable only as a SecretInput (renders empty, "leave blank to keep"); on read-only
        # pages it is left out, because a read-only field would print the stored value.
        if self.has_change_permission(request, obj):
            fields.insert(1, "password")
        return fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return ("username", "device", "owner", "created_at")


# Switch actions for a selection of devices (lamp control, apps.devices.admin_commands).
from .admin_commands import SWITCH_ACTIONS  # noqa: E402

DeviceAdmin.actions = (*(DeviceAdmin.actions or ()), *SWITCH_ACTIONS)
# Broker logins, for platform operators (apps.devices.admin_credentials).
DeviceAdmin.actions = (*DeviceAdmin.actions, issue_or_rotate)
DeviceCredentialAdmin.actions = (*(DeviceCredentialAdmin.actions or ()), revoke_credentials)
