"""Admin for webhook destinations: settings, secret headers, Test Connection, secret rotation.

Secrets are write-only: the signing secret and secret header values render as empty password
inputs ("set — leave blank to keep"). A secret the platform generates (on creation, or by
rotation) is shown exactly once, in the response to that request, and stored nowhere else.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.html import format_html
from django.views.decorators.http import require_POST
from unfold.admin import TabularInline
from unfold.decorators import display

from apps.owners.admin_mixins import OwnerScopedAdminMixin

from .. import actions, stats
from ..destination_admin import DestinationAdmin, DestinationForm
from ..kinds import TestResult
from ..models import EVENT_TYPE_CHOICES
from .models import WebhookDestination, WebhookHeader


class TemplateField(forms.JSONField):
    """No template shows as an empty box, not as the JSON literal `null`."""

    def prepare_value(self, value: Any) -> Any:
        return "" if value is None else super().prepare_value(value)


class WebhookDestinationForm(DestinationForm):
    event_types = forms.MultipleChoiceField(
        choices=EVENT_TYPE_CHOICES,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Leave all unticked to receive every event type.",
    )

    class Meta:
        model = WebhookDestination
        field_classes = {"payload_template": TemplateField}
        fields = (
            "owner",
            "name",
            "url",
            "method",
            "enabled",
            "event_types",
            "devices",
            "payload_template",
            "secret",
            "timeout",
            "max_attempts",
            "initial_delay",
            "backoff_factor",
            "max_delay",
            "max_in_flight",
            "rate_limit",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        secret = self.fields.get("secret")
        if secret is not None:
            secret.widget.allow_clear = False  # blank means "keep"; a new one comes by rotation
            secret.help_text = (
                "Leave blank to keep the current secret (or, for a new destination, to have one "
                "generated and shown once). Paste a whsec_… secret to set your own."
            )


class WebhookHeaderInline(OwnerScopedAdminMixin, TabularInline):
    model = WebhookHeader
    fields = ("name", "value", "secret_value")
    extra = 0


@admin.register(WebhookDestination)
class WebhookDestinationAdmin(DestinationAdmin):
    form = WebhookDestinationForm
    inlines = [WebhookHeaderInline]
    list_display = (
        "name",
        "owner",
        "url",
        "state",
        "success",
        "last_success_at",
        "last_error",
        "test_result",
    )
    list_filter = ("enabled", "owner")
    search_fields = ("name", "url")
    autocomplete_fields = ()
    filter_horizontal = ("devices",)
    actions = ["test_selected", "enable_selected", "disable_selected"]
    readonly_fields = ("monitoring", "test_result")
    change_form_before_template = "forwarding/webhook_tools.html"
    fieldsets = (
        (None, {"fields": ("owner", "name", "url", "method", "enabled")}),
        ("Monitoring", {"fields": ("monitoring", "test_result")}),
        ("What to send", {"fields": ("event_types", "devices", "payload_template")}),
        ("Signing", {"fields": ("secret",)}),
        (
            "Retries and limits",
            {
                "fields": (
                    "timeout",
                    "max_attempts",
                    "initial_delay",
                    "backoff_factor",
                    "max_delay",
                    "max_in_flight",
                    "rate_limit",
                )
            },
        ),
    )

    # --- display ----------------------------------------------------------------------------

    @display(
        description="State",
        label={"Enabled": "success", "Failing": "warning", "Disabled": "danger"},
    )
    def state(self, obj: WebhookDestination) -> str:
        if not obj.enabled:
            return "Disabled"
        return "Failing" if obj.failing_since else "Enabled"

    @display(description="Figures")
    def monitoring(self, obj: WebhookDestination | None) -> str:
        if obj is None or obj.pk is None:
            return "–"
        figures = stats.figures([obj])[obj.pk]
        rate = obj.success_rate
        return format_html(
            "Delivered {} · failed for good {} · retries {} · success rate {}<br>"
            "Last success {} · backlog {} ({} sending) · latency p50 {} ms, p95 {} ms<br>"
            "Last error: {}{}",
            obj.delivered_count,
            obj.failed_count,
            obj.retried_count,
            "–" if rate is None else f"{rate:.1%}",
            f"{obj.last_success_at:%Y-%m-%d %H:%M:%S} UTC" if obj.last_success_at else "never",
            figures.backlog,
            figures.sending,
            figures.p50_ms if figures.p50_ms is not None else "–",
            figures.p95_ms if figures.p95_ms is not None else "–",
            obj.last_error or "none",
            f" — disabled: {obj.disabled_reason}" if obj.disabled_reason else "",
        )

    # --- saving -----------------------------------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: WebhookDestination, form: Any, change: bool
    ) -> None:
        generated = not obj.secret
        super().save_model(request, obj, form, change)
        # Shown once, by response_add, never stored outside the encrypted field.
        request._generated_secret = obj.secret.reveal() if generated else None  # type: ignore[attr-defined]

    def response_add(
        self, request: HttpRequest, obj: WebhookDestination, post_url_continue: Any = None
    ) -> HttpResponse:
        secret = getattr(request, "_generated_secret", None)
        if secret:
            return self._show_secret(request, obj, secret, "created")
        return super().response_add(request, obj, post_url_continue)

    def _show_secret(
        self, request: HttpRequest, obj: WebhookDestination, secret: str, what: str
    ) -> HttpResponse:
        response = TemplateResponse(
            request,
            "forwarding/secret_once.html",
            {
                **self.admin_site.each_context(request),
                "title": f"Signing secret of {obj.name}",
                "destination": obj,
                "secret": secret,
                "what": what,
                "change_url": self.change_url(obj),
            },
        )
        response["Cache-Control"] = "no-store"
        return response

    # --- extra views: rotate (test, enable/disable: DestinationAdmin) -------------------------

    def extra_urls(self, name: str) -> list:
        view = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/rotate/",
                view(require_POST(self.rotate_view)),
                name=f"{name}_rotate",
            )
        ]

    def test_message(self, result: TestResult) -> str:
        code = f" (HTTP {result.status_code})" if result.status_code else ""
        return f"{result.message}{code}."

    def rotate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self.scoped(request, object_id, self.change_role)
        secret = actions.rotate_secret(obj)
        return self._show_secret(request, obj, secret, "rotated")

    # --- list actions -----------------------------------------------------------------------

    @admin.action(description="Test Connection (signed ping)", permissions=["operate"])
    def test_selected(self, request: HttpRequest, queryset: QuerySet[WebhookDestination]) -> None:
        self.test_each(request, queryset)

    @admin.action(description="Enable (and send their backlog)", permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[WebhookDestination]) -> None:
        self.enable_each(request, queryset)

    @admin.action(description="Disable", permissions=["change"])
    def disable_selected(
        self, request: HttpRequest, queryset: QuerySet[WebhookDestination]
    ) -> None:
        self.disable_each(request, queryset)
