"""People, for platform operators only. Tenant admins manage their team on the owner's
Members tab (apps.owners.admin), which never lists accounts of other owners."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin as BaseGroupAdmin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.contrib.auth.models import Group
from django.http import HttpRequest
from unfold.admin import ModelAdmin, TabularInline
from unfold.forms import AdminPasswordChangeForm, UserChangeForm, UserCreationForm

from apps.owners.admin_mixins import OwnerScopedAdminMixin
from apps.owners.models import Membership

from .models import User


class SuperuserOnlyMixin:
    """Ignore Django model permissions: a tenant user given `auth.change_user` by mistake must
    still not edit other people's accounts."""

    def _is_operator(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._is_operator(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._is_operator(request)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._is_operator(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._is_operator(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self._is_operator(request)


class UserMembershipInline(OwnerScopedAdminMixin, TabularInline):
    model = Membership
    fields = ("owner", "role", "created_at")
    readonly_fields = ("created_at",)
    extra = 0
    verbose_name = "membership"
    verbose_name_plural = "IoT owners"


@admin.register(User)
class UserAdmin(SuperuserOnlyMixin, BaseUserAdmin, ModelAdmin):
    form = UserChangeForm
    add_form = UserCreationForm
    change_password_form = AdminPasswordChangeForm
    inlines = (UserMembershipInline,)
    list_display = ("username", "email", "first_name", "last_name", "is_superuser", "is_active")
    list_filter = ("is_superuser", "is_active")


admin.site.unregister(Group)


@admin.register(Group)
class GroupAdmin(SuperuserOnlyMixin, BaseGroupAdmin, ModelAdmin):
    pass
