"""Admin of Data Delivery: deliveries (dead letters, replay), the attempt log, alerts, and the
Data Delivery tab of the IoT Owners page. Each kind registers its destination admin in its own
sub-package (`webhook/admin.py`), imported below.

Everything is owner-scoped by OwnerScopedAdminMixin; replay needs the operator role on the
deliveries' owner. Payloads are tenant data: visible only through the scoped querysets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import NoReverseMatch, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.html import format_html
from django.views.decorators.http import require_POST
from unfold.admin import ModelAdmin, TabularInline
from unfold.decorators import display

from apps.owners.admin_mixins import OwnerScopedAdminMixin, OwnerScopedRelatedFilter
from apps.owners.admin_tabs import OwnerTab, register_owner_tab
from apps.owners.models import Owner, Role
from apps.owners.scoping import has_role, owners_for, scope

from . import actions, stats
from .database import admin as _database_admin  # registers DatabaseDestinationAdmin
from .destination_admin import back_url
from .kinds import KINDS
from .models import Attempt, Delivery, DeliveryAlert, Destination, Outcome, Status
from .webhook import admin as _webhook_admin  # noqa: F401 - registers WebhookDestinationAdmin

STATUS_LABELS = {
    "Pending": "info",
    "Sending": "info",
    "Delivered": "success",
    "Failed": "danger",
}
OUTCOME_LABELS = {
    label: "success"
    if value == Outcome.DELIVERED
    else "warning"
    if value in (Outcome.RETRY, Outcome.INTERRUPTED)
    else "danger"
    for value, label in Outcome.choices
}
TAB_ATTEMPTS = 20
TAB_DEAD_LETTERS = 10
ATTEMPTS_INLINE = 50


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AttemptInline(OwnerScopedAdminMixin, ReadOnlyMixin, TabularInline):
    model = Attempt
    fields = ("number", "started_at", "outcome", "status_code", "duration_ms", "error", "response")
    readonly_fields = fields
    ordering = ("-id",)
    extra = 0
    max_num = 0
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Attempt]:
        # The newest ATTEMPTS_INLINE, without slicing the queryset the formset filters later.
        qs = super().get_queryset(request)
        newest = qs.order_by("-id").values_list("id", flat=True)[:ATTEMPTS_INLINE]
        return qs.filter(id__in=list(newest))


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = parse_datetime(value)
    if parsed is None:
        return None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


@admin.register(Delivery)
class DeliveryAdmin(OwnerScopedAdminMixin, ReadOnlyMixin, ModelAdmin):
    list_display = (
        "id",
        "created_at",
        "destination",
        "event_type",
        "device",
        "events",
        "state",
        "attempts",
        "last_status_code",
        "last_error",
        "delivered_at",
    )
    list_filter = ("status", "event_type", ("destination", OwnerScopedRelatedFilter), "owner")
    list_select_related = ("destination",)
    search_fields = ("=message_id", "=event_id", "=device")
    date_hierarchy = "created_at"
    show_full_result_count = False
    actions = ["replay_selected"]
    inlines = [AttemptInline]
    fields = (
        "destination",
        "owner",
        "event_id",
        "event_type",
        "device",
        "message_id",
        "events",
        "state",
        "attempts",
        "next_attempt_at",
        "last_attempt_at",
        "last_status_code",
        "last_error",
        "delivered_at",
        "replays",
        "created_at",
        "payload_json",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Delivery]:
        # An inner join on every page, the change view included: the outbox has no database
        # foreign keys, so a listener may briefly hold rows of a just-deleted destination
        # (until the sweep removes them); they are not shown rather than failing the page.
        return super().get_queryset(request).select_related("destination")

    @display(description="Status", ordering="status", label=STATUS_LABELS)
    def state(self, obj: Delivery) -> str:
        return obj.get_status_display()

    @display(description="Payload (the event)")
    def payload_json(self, obj: Delivery) -> str:
        text = orjson.dumps(obj.payload, option=orjson.OPT_INDENT_2).decode()
        return format_html('<pre class="text-xs whitespace-pre-wrap">{}</pre>', text)

    def has_operate_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_role(request, self.operate_role, obj)

    def _replayable(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> QuerySet[Delivery]:
        # Viewers see deliveries; only operators of their owner may send them again.
        return scope(queryset, request.user, Role.OPERATOR)

    @admin.action(description="Replay (same webhook-id, new attempt)", permissions=["operate"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        count = actions.replay_deliveries(self._replayable(request, queryset))
        self.message_user(request, f"{count} deliveries queued again.", messages.SUCCESS)

    def get_urls(self) -> list:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path(
                "replay/",
                self.admin_site.admin_view(require_POST(self.replay_view)),
                name=f"{name}_replay",
            ),
            path(
                "owner/<int:owner_id>/tab/",
                self.admin_site.admin_view(self.owner_tab_view),
                name=f"{name}_owner_tab",
            ),
            *super().get_urls(),
        ]

    def owner_tab_view(self, request: HttpRequest, owner_id: int) -> HttpResponse:
        """The Data Delivery tab alone: the tab polls it to keep its figures live."""
        owner = owners_for(request.user).filter(pk=owner_id).first()
        if owner is None:
            raise Http404("No such owner")
        return render(request, "forwarding/owner_tab.html", owner_delivery_context(request, owner))

    def replay_view(self, request: HttpRequest) -> HttpResponse:
        """Replay from buttons: `id` (repeatable), or `destination` with `since`/`until`."""
        deliveries = self._replayable(request, self.get_queryset(request))
        ids = [int(i) for i in request.POST.getlist("id") if i.isdigit()]
        if ids:
            count = actions.replay_deliveries(deliveries.filter(id__in=ids))
        elif request.POST.get("destination", "").isdigit():
            count = actions.replay_range(
                deliveries.filter(destination_id=int(request.POST["destination"])),
                since=_when(request.POST.get("since")),
                until=_when(request.POST.get("until")),
                include_delivered=request.POST.get("include_delivered") == "1",
            )
        else:
            count = 0
        self.message_user(request, f"{count} deliveries queued again.", messages.SUCCESS)
        return HttpResponseRedirect(
            back_url(request, reverse("admin:forwarding_delivery_changelist"))
        )


@admin.register(Attempt)
class AttemptAdmin(OwnerScopedAdminMixin, ReadOnlyMixin, ModelAdmin):
    """The per-attempt log: status, HTTP code, duration, truncated response."""

    list_display = (
        "started_at",
        "destination",
        "delivery",
        "number",
        "result",
        "status_code",
        "duration_ms",
        "error",
        "response",
    )
    list_filter = ("outcome", ("destination", OwnerScopedRelatedFilter), "owner")
    list_select_related = ("destination",)
    date_hierarchy = "started_at"
    show_full_result_count = False
    search_fields = ("=delivery__id",)

    @display(description="Outcome", ordering="outcome", label=OUTCOME_LABELS)
    def result(self, obj: Attempt) -> str:
        return obj.get_outcome_display()


@admin.register(DeliveryAlert)
class DeliveryAlertAdmin(OwnerScopedAdminMixin, ReadOnlyMixin, ModelAdmin):
    list_display = ("created_at", "destination", "kind", "message", "resolved_at")
    list_filter = ("kind", "owner")
    list_select_related = ("destination",)
    actions = ["resolve_selected"]

    def has_operate_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_role(request, self.operate_role, obj)

    @admin.action(description="Mark as seen", permissions=["operate"])
    def resolve_selected(self, request: HttpRequest, queryset: QuerySet[DeliveryAlert]) -> None:
        count = (
            scope(queryset, request.user, Role.OPERATOR)
            .filter(resolved_at=None)
            .update(resolved_at=timezone.now())
        )
        self.message_user(request, f"{count} alert(s) marked as seen.")


# --- the Data Delivery tab of the IoT Owners page ---------------------------------------------


def _url(name: str, *args: Any) -> str:
    try:
        return reverse(name, args=args)
    except NoReverseMatch:
        return ""


def owner_delivery_context(request: HttpRequest, owner: Owner) -> dict[str, Any]:
    # The owner page is reached through OwnerAdmin.get_object: `owner` is already scoped.
    destinations = list(Destination.objects.filter(owner=owner).order_by("name"))
    figures = stats.figures(destinations)
    operator = has_role(request.user, owner.pk, Role.OPERATOR)
    admin_role = has_role(request.user, owner.pk, Role.ADMIN)
    rows = []
    for d in destinations:
        model_name = KINDS[d.kind].model._meta.model_name if d.kind in KINDS else ""
        rows.append(
            {
                "destination": d,
                "kind": KINDS[d.kind].label if d.kind in KINDS else d.kind,
                "figures": figures.get(d.pk, stats.Figures.empty()),
                "change_url": _url(f"admin:forwarding_{model_name}_change", d.pk),
                "test_url": _url(f"admin:forwarding_{model_name}_test", d.pk) if operator else "",
                "enabled_url": _url(f"admin:forwarding_{model_name}_enabled", d.pk)
                if admin_role
                else "",
                "deliveries_url": f"{reverse('admin:forwarding_delivery_changelist')}"
                f"?destination__id__exact={d.pk}",
            }
        )
    dead = (
        Delivery.objects.filter(owner=owner, status=Status.FAILED)
        .select_related("destination")
        .order_by("-id")[:TAB_DEAD_LETTERS]
    )
    add_urls = (
        [
            (kind.label, _url(f"admin:forwarding_{kind.model._meta.model_name}_add"))
            for kind in KINDS.values()
        ]
        if admin_role
        else []
    )
    return {
        "rows": rows,
        "alerts": DeliveryAlert.objects.filter(owner=owner, resolved_at=None).select_related(
            "destination"
        )[:10],
        "dead_letters": list(dead),
        "attempts": Attempt.objects.filter(owner=owner)
        .select_related("destination")
        .order_by("-id")[:TAB_ATTEMPTS],
        "add_urls": [(label, url) for label, url in add_urls if url],
        "can_replay": operator,
        "replay_url": reverse("admin:forwarding_delivery_replay"),
        "attempts_url": f"{reverse('admin:forwarding_attempt_changelist')}"
        f"?owner__id__exact={owner.pk}",
        "deliveries_url": f"{reverse('admin:forwarding_delivery_changelist')}"
        f"?owner__id__exact={owner.pk}",
        "next": request.get_full_path() + "#data-delivery",
        "db_batches": _database_admin.recent_batches(owner.pk),
    }


register_owner_tab(
    OwnerTab(
        key="data-delivery",
        title="Data Delivery",
        order=30,
        template="forwarding/owner_tab.html",
        context=owner_delivery_context,
    )
)
