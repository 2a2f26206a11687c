"""The "IoT Owners" page: one owner's change view, in tabs (see apps.owners.admin_tabs)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.text import slugify
from unfold.admin import ModelAdmin, TabularInline
from unfold.decorators import display
from unfold.forms import PaginationInlineFormSet

from apps.devices.models import Connection, Device, QuarantinedMessage, Telemetry

from .admin_mixins import OwnerScopedAdminMixin
from .admin_tabs import GENERAL, OwnerTab, owner_tabs, register_owner_tab
from .models import Membership, Owner, Role
from .scoping import has_role as user_has_role


class MembershipForm(forms.ModelForm):
    """A member is added by username or e-mail, never picked from a list of every account."""

    member = forms.CharField(
        label="User", help_text="Username or e-mail address of an existing account."
    )

    class Meta:
        model = Membership
        fields = ("role",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["member"].initial = self.instance.user.get_username()
            self.fields["member"].disabled = True  # who a row belongs to never changes
            self.fields["member"].help_text = ""

    def clean_member(self) -> str:
        value = self.cleaned_data["member"].strip()
        if self.instance.pk:
            return value
        user_model = get_user_model()
        matches = list(
            user_model._default_manager.filter(
                Q(**{user_model.USERNAME_FIELD: value}) | Q(email__iexact=value), is_active=True
            )[:2]
        )
        if not matches:
            raise ValidationError("No active account has this username or e-mail address.")
        if len(matches) > 1:
            raise ValidationError("Several accounts use this e-mail address; enter the username.")
        self.instance.user = matches[0]
        return value


class MembershipFormSet(PaginationInlineFormSet):
    """Guards the owner role: only owners grant or remove it, and the last one cannot go."""

    acting_user: Any = None  # set per request by MembershipInline.get_formset

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        acting_is_owner = user_has_role(self.acting_user, self.instance.pk, Role.OWNER)
        had_owner = False
        owners_left = 0
        seen_users: set[int] = set()
        for form in self.forms:
            if not form.instance.pk and not form.has_changed():
                continue  # an untouched blank row
            deleted = self._should_delete_form(form)
            old_role = form.initial.get("role") if form.instance.pk else None
            new_role = None if deleted else form.cleaned_data.get("role")
            had_owner |= old_role == Role.OWNER
            if new_role == Role.OWNER:
                owners_left += 1
            if (old_role == Role.OWNER) != (new_role == Role.OWNER) and not acting_is_owner:
                raise ValidationError("Only a member with the owner role may grant or remove it.")
            if deleted:
                continue
            user_id = form.instance.user_id
            if user_id in seen_users or (
                not form.instance.pk
                and Membership.objects.filter(owner=self.instance, user_id=user_id).exists()
            ):
                raise ValidationError(f"{form.instance.user} is already a member.")
            seen_users.add(user_id)
        if had_owner and not owners_left:
            raise ValidationError("An IoT owner needs at least one member with the owner role.")


class MembershipInline(OwnerScopedAdminMixin, TabularInline):
    model = Membership
    form = MembershipForm
    formset = MembershipFormSet
    fields = ("member", "email", "role", "created_at")
    readonly_fields = ("email", "created_at")
    extra = 0
    tab = True
    hide_title = True
    verbose_name = "member"
    verbose_name_plural = "members"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        return super().get_queryset(request).select_related("user").order_by("user__username")

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        formset = super().get_formset(request, obj, **kwargs)
        formset.acting_user = request.user  # a fresh class per call: safe to set
        return formset

    @display(description="User")
    def member(self, obj: Membership) -> str:
        # Shown instead of the form field on read-only (viewer) pages.
        return obj.user.get_username()

    @display(description="E-mail")
    def email(self, obj: Membership) -> str:
        return obj.user.email if obj.pk else ""


def overview_context(request: HttpRequest, owner: Owner) -> dict[str, Any]:
    now = timezone.now()
    by_connection = dict(
        Device.objects.filter(owner=owner)
        .order_by()
        .values_list("connection")
        .annotate(n=Count("pk"))
    )
    return {
        "counts": [
            ("online", "Devices online", by_connection.get(Connection.ONLINE, 0), "success"),
            ("offline", "Devices offline", by_connection.get(Connection.OFFLINE, 0), "danger"),
            ("unknown", "Devices unknown", by_connection.get(Connection.UNKNOWN, 0), ""),
            (
                "messages_1h",
                "Messages, last hour",
                Telemetry.objects.filter(
                    owner=owner, received_at__gte=now - timedelta(hours=1)
                ).count(),
                "info",
            ),
            (
                "quarantined_24h",
                "Quarantined, last 24 h",
                QuarantinedMessage.objects.filter(
                    owner=owner, received_at__gte=now - timedelta(hours=24)
                ).count(),
                "warning",
            ),
            ("members", "Members", owner.memberships.count(), ""),
        ],
    }


register_owner_tab(
    OwnerTab(
        key=GENERAL,
        title="Overview",
        order=0,
        template="admin/owners/owner/overview_tab.html",
        context=overview_context,
    )
)
register_owner_tab(OwnerTab(key="members", title="Members", order=90, inline=MembershipInline))


@admin.register(Owner)
class OwnerAdmin(OwnerScopedAdminMixin, ModelAdmin):
    list_display = ("name", "slug", "timezone", "device_count", "member_count", "created_at")
    search_fields = ("name", "slug")
    fields = ("name", "slug", "timezone")
    change_form_outer_before_template = "admin/owners/owner/tab_panels.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Owner]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                n_devices=Count("devices", distinct=True),
                n_members=Count("memberships", distinct=True),
            )
            # Explicit: with GROUP BY, Meta.ordering no longer counts as ordered (autocomplete
            # pages through this queryset).
            .order_by(*Owner._meta.ordering)
        )

    @display(description="Devices", ordering="n_devices")
    def device_count(self, obj: Owner) -> int:
        return obj.n_devices

    @display(description="Members", ordering="n_members")
    def member_count(self, obj: Owner) -> int:
        return obj.n_members

    # Owners are created and removed by platform operators; members manage what is inside.
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_superuser

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # The slug names the owner in URLs and topics of other systems: operators only.
        return () if request.user.is_superuser else ("slug",)

    def get_prepopulated_fields(self, request: HttpRequest, obj: Any = None) -> dict:
        return {"slug": ("name",)} if request.user.is_superuser and obj is None else {}

    def visible_tabs(self, request: HttpRequest, obj: Owner) -> list[OwnerTab]:
        return [tab for tab in owner_tabs() if self.has_role(request, tab.min_role, obj)]

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> list[type]:
        if obj is None:
            return []  # a new owner has nothing to show; its members are added afterwards
        return [tab.inline for tab in self.visible_tabs(request, obj) if tab.inline]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Owner | None = None,
    ) -> TemplateResponse:
        if obj is not None and obj.pk:
            context.update(self._tabs_context(request, obj, context["inline_admin_formsets"]))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _tabs_context(
        self, request: HttpRequest, owner: Owner, inline_formsets: list
    ) -> dict[str, Any]:
        # Inline tabs are shown by unfold when its Alpine `activeTab` equals the slug of the
        # formset prefix; panel tabs use their key. Passing `tab_list` here replaces unfold's
        # automatic "General + one tab per inline" bar with ours, in our order and titles.
        prefixes = {type(f.opts): slugify(f.formset.prefix) for f in inline_formsets}
        items, panels = [], []
        for tab in self.visible_tabs(request, owner):
            if tab.inline is not None:
                key = prefixes.get(tab.inline)
                if key is None:
                    continue
            else:
                key = tab.key
                extra = tab.context(request, owner) if tab.context else {}
                html = render_to_string(
                    tab.template, {**extra, "owner": owner, "tab_key": key}, request=request
                )
                panels.append({"key": key, "html": html})
            items.append(
                {
                    "title": tab.title,
                    "link": "",
                    "inline": key,
                    "has_permission": True,
                    "active": False,
                }
            )
        return {
            "tab_list": [
                {"models": [{"name": str(self.model._meta), "detail": True}], "items": items}
            ],
            "owner_tab_panels": panels,
        }
