"""API keys in the admin: the "API keys" tab of the IoT Owners page, creation (token shown once,
on the response to the POST, never stored or redirected through a cookie), and revocation."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from unfold.admin import ModelAdmin
from unfold.decorators import display

from apps.owners.admin_mixins import OwnerScopedAdminMixin
from apps.owners.admin_tabs import OwnerTab, register_owner_tab
from apps.owners.models import Owner, Role
from apps.owners.scoping import has_role

from .actions import clean_scopes, create_api_key, revoke_api_key
from .models import ApiKey, Scope

TAB_KEYS = 200


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="Give a key only what its integration needs.",
    )

    class Meta:
        model = ApiKey
        fields = ("owner", "name", "scopes")


@admin.register(ApiKey)
class ApiKeyAdmin(OwnerScopedAdminMixin, ModelAdmin):
    form = ApiKeyForm
    # Keys act for the whole owner: only its admins and owners see or manage them.
    view_role = Role.ADMIN
    change_role = Role.ADMIN
    list_display = (
        "name",
        "owner",
        "prefix_shown",
        "scope_list",
        "created_at",
        "last_used_at",
        "state",
    )
    list_filter = ("owner",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix_shown", "created_at", "created_by", "last_used_at", "revoked_at")

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        if obj is None:
            return ["owner", "name", "scopes"]
        return ["name", "scopes", *self.readonly_fields]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is not None and obj.revoked_at:
            return ("name", "scopes", *self.readonly_fields)
        return self.readonly_fields

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any):
        if obj is not None:
            kwargs["fields"] = [
                f for f in ("name", "scopes") if f not in self.get_readonly_fields(request, obj)
            ]
        return super().get_form(request, obj, change, **kwargs)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        scopes = form.cleaned_data.get("scopes", obj.scopes)
        if change:
            obj.scopes = clean_scopes(scopes)
            obj.save(update_fields=["name", "scopes"])
            return
        key, token = create_api_key(obj.owner, obj.name, scopes, created_by=request.user)
        # The admin goes on with `obj` (log entry, response): make it the saved row.
        obj.__dict__.update({k: v for k, v in key.__dict__.items() if k != "_state"})
        obj._state.adding, obj._state.db = False, key._state.db
        request._api_token = token  # type: ignore[attr-defined]  # for response_add only

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: Any = None):
        token = getattr(request, "_api_token", None)
        if token is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": "API key created",
            "key": obj,
            "token": token,
            "owner_url": reverse("admin:owners_owner_change", args=[obj.owner_id]) + "#api-keys",
            "opts": self.model._meta,
        }
        response = TemplateResponse(request, "admin/api/apikey/created.html", context)
        response["Cache-Control"] = "no-store"  # the token must not linger in any cache
        return response

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:pk>/revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="api_apikey_revoke",
            ),
            *super().get_urls(),
        ]

    def revoke_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        return _revoke(self, request, pk)

    @display(description="Key")
    def prefix_shown(self, obj: ApiKey) -> str:
        return f"{obj.prefix}…" if obj.prefix else ""

    @display(description="Scopes")
    def scope_list(self, obj: ApiKey) -> str:
        return ", ".join(obj.scopes or []) or "–"

    @display(description="State", label={"active": "success", "revoked": "danger"})
    def state(self, obj: ApiKey) -> tuple[str, str]:
        return ("active", "Active") if obj.is_active else ("revoked", "Revoked")


def _revoke(model_admin: ApiKeyAdmin, request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(model_admin.get_queryset(request), pk=pk)  # scoped: 404 otherwise
    if not model_admin.has_change_permission(request, key):
        raise PermissionDenied
    if revoke_api_key(key, by=request.user):
        messages.success(request, f"API key “{key.name}” revoked; it no longer works.")
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        target = reverse("admin:api_apikey_change", args=[key.pk])
    return HttpResponseRedirect(target)


# --- the tab ------------------------------------------------------------------------------------


def api_keys_context(request: HttpRequest, owner: Owner) -> dict[str, Any]:
    keys: QuerySet[ApiKey] = ApiKey.objects.filter(owner=owner).select_related("created_by")
    manage = has_role(request.user, owner.pk, Role.ADMIN)
    return {
        "keys": list(keys[:TAB_KEYS]),
        "total": keys.count(),
        "add_url": f"{reverse('admin:api_apikey_add')}?owner={owner.pk}" if manage else "",
        "can_revoke": manage,
        "next": request.get_full_path() + "#api-keys",
        "docs_url": reverse("api:docs"),
    }


register_owner_tab(
    OwnerTab(
        key="api-keys",
        title="API keys",
        order=50,
        template="admin/api/owner_tab.html",
        context=api_keys_context,
        min_role=Role.ADMIN,
    )
)
