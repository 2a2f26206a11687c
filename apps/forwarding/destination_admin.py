"""What the kinds' destination admins share (`webhook.admin`, `database.admin`).

The owner is fixed once a destination exists (its secrets are encrypted bound to it); Test
Connection and enable/disable are POST-only views and list actions, each checking the user's
role on that destination's owner (another owner's destination is a 404); the success rate and
the last test are shown alike. A kind's admin adds its own fields, displays and wording.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST
from unfold.admin import ModelAdmin
from unfold.decorators import display

from apps.owners.admin_mixins import OwnerScopedAdminMixin

from . import actions
from .kinds import TestResult
from .models import Destination


def back_url(request: HttpRequest, default: str) -> str:
    """Where a POST-only view sends the user back to: the form's `next`, if it is ours."""
    back = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()):
        return back
    return default


class DestinationForm(forms.ModelForm):
    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        owner = cleaned.get("owner") or (self.instance.owner if self.instance.pk else None)
        devices = cleaned.get("devices")
        if owner is not None and devices is not None:
            foreign = [d for d in devices if d.owner_id != owner.pk]
            if foreign:
                # A member of two owners must not route one owner's devices to the other.
                self.add_error("devices", "Pick devices of this destination's owner only.")
        return cleaned


class DestinationAdmin(OwnerScopedAdminMixin, ModelAdmin):
    # "… waiting deliveries will be sent" (webhooks) / "written" (databases).
    backlog_verb = "sent"

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple:
        # The owner is fixed once created: secrets are encrypted bound to it.
        fields = tuple(super().get_readonly_fields(request, obj))
        return (*fields, "owner") if obj is not None else fields

    # --- display ----------------------------------------------------------------------------

    @display(description="Success rate")
    def success(self, obj: Destination) -> str:
        rate = obj.success_rate
        return "–" if rate is None else f"{rate:.1%}"

    @display(description="Last test")
    def test_result(self, obj: Destination) -> str:
        if obj.last_test_at is None:
            return "never"
        verdict = "OK" if obj.last_test_ok else "failed"
        code = f" · HTTP {obj.last_test_status}" if obj.last_test_status else ""
        ms = f" · {obj.last_test_ms} ms" if obj.last_test_ms is not None else ""
        return (
            f"{verdict}{code}{ms} — {obj.last_test_message} ({obj.last_test_at:%Y-%m-%d %H:%M} UTC)"
        )

    def test_message(self, result: TestResult) -> str:
        return result.message

    # --- saving -----------------------------------------------------------------------------

    def save_model(self, request: HttpRequest, obj: Destination, form: Any, change: bool) -> None:
        re_enabled = change and obj.enabled and form.initial.get("enabled") is False
        if re_enabled:
            obj.enabled = False  # enable_destination() does it, and drains the backlog in order
        super().save_model(request, obj, form, change)
        self.saved(request, obj, form)
        if re_enabled:
            backlog = actions.enable_destination(obj)
            self.message_user(
                request, f"Enabled; {backlog} waiting deliveries will be {self.backlog_verb}."
            )
        self.changed(obj)

    def saved(self, request: HttpRequest, obj: Destination, form: Any) -> None:
        """After the row is saved, before a re-enabled destination's backlog is queued."""

    def changed(self, obj: Destination) -> None:
        """The kind's reaction to a saved destination (caches, a Test Connection)."""
        actions.destination_saved(obj)

    # --- extra views: test, enable/disable ----------------------------------------------------

    def get_urls(self) -> list:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        view = self.admin_site.admin_view
        return [
            path("<path:object_id>/test/", view(require_POST(self.test_view)), name=f"{name}_test"),
            path(
                "<path:object_id>/enabled/",
                view(require_POST(self.enabled_view)),
                name=f"{name}_enabled",
            ),
            *self.extra_urls(name),
            *super().get_urls(),
        ]

    def extra_urls(self, name: str) -> list:
        return []

    def scoped(self, request: HttpRequest, object_id: str, role: str) -> Any:
        obj = self.get_object(request, object_id)  # another owner's destination: 404
        if obj is None or not self.has_role(request, role, obj):
            raise Http404("No such destination")
        return obj

    def change_url(self, obj: Destination) -> str:
        return reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[obj.pk])

    def test_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self.scoped(request, object_id, self.operate_role)
        result = actions.test_destination(obj)
        level = messages.SUCCESS if result.ok else messages.ERROR
        self.message_user(
            request, f"Test Connection of “{obj}”: {self.test_message(result)}", level
        )
        return HttpResponseRedirect(back_url(request, self.change_url(obj)))

    def enabled_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self.scoped(request, object_id, self.change_role)
        if request.POST.get("enabled") == "1":
            backlog = actions.enable_destination(obj)
            self.message_user(
                request,
                f"“{obj}” enabled; {backlog} waiting deliveries will be {self.backlog_verb}.",
            )
        else:
            actions.disable_destination(obj, f"Disabled by {request.user.get_username()}.")
            self.message_user(request, f"“{obj}” disabled; new events are not queued for it.")
        return HttpResponseRedirect(back_url(request, self.change_url(obj)))

    # --- list actions (each kind declares them, with its own wording) ----------------------------

    def test_each(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for obj in queryset[:20]:
            if self.has_role(request, self.operate_role, obj):
                result = actions.test_destination(obj)
                level = messages.SUCCESS if result.ok else messages.ERROR
                self.message_user(request, f"“{obj}”: {self.test_message(result)}", level)

    def enable_each(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for obj in queryset:
            if self.has_role(request, self.change_role, obj):
                actions.enable_destination(obj)
        self.message_user(request, "Enabled.")

    def disable_each(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for obj in queryset:
            if self.has_role(request, self.change_role, obj):
                actions.disable_destination(obj, f"Disabled by {request.user.get_username()}.")
        self.message_user(request, "Disabled.")
