"""The admin site: who may enter it at all.

Tenant users enter the admin because they are members of an owner, not because someone ticked
`is_staff` and a list of Django model permissions for them. A flag copied onto the user would
have to be kept in step with every way a membership is created or removed (admin inline, API,
demo data, a future invitation flow) and would outlive the last membership; asking the
membership table on each request cannot drift. So:

- `PlatformAdminSite.has_permission`: active superusers, and active users with at least one
  membership. Everything else a member may see or do is decided per row by
  `apps.owners.admin_mixins.OwnerScopedAdminMixin` from their roles.
- The login form applies the same rule instead of Django's `is_staff` check.
- `is_staff` keeps no meaning of its own for tenant users; superusers are platform operators.

Wired in settings: `"unfold.apps.BasicAppConfig"` (so unfold does not install its own site)
and `"apps.owners.admin_apps.PlatformAdminConfig"` in place of `"django.contrib.admin"`.
"""

from __future__ import annotations

from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.contrib.contenttypes.views import shortcut
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import URLPattern, path
from unfold.forms import AuthenticationForm
from unfold.sites import UnfoldAdminSite

from .models import Membership


def may_use_admin(user: Any) -> bool:
    """The one rule for entering the admin (the login form and every admin view use it)."""
    if not (user and user.is_authenticated and user.is_active):
        return False
    if user.is_superuser:
        return True
    return Membership.objects.filter(user=user).exists()


def is_superuser(request: HttpRequest) -> bool:
    """Permission callback for sidebar items meant for platform operators only."""
    return bool(request.user.is_active and request.user.is_superuser)


def is_member_or_superuser(request: HttpRequest) -> bool:
    """Permission callback for sidebar items every admin user may see."""
    return may_use_admin(request.user)


class PlatformLoginForm(AuthenticationForm):
    def confirm_login_allowed(self, user: Any) -> None:
        # Same message as a wrong password: the login page must not tell a stranger that a
        # password was right for an account without access.
        if not may_use_admin(user):
            raise ValidationError(
                self.error_messages["invalid_login"],
                code="invalid_login",
                params={"username": self.username_field.verbose_name},
            )


class PlatformAdminSite(UnfoldAdminSite):
    login_form = PlatformLoginForm

    def has_permission(self, request: HttpRequest) -> bool:
        # Cached on the request: each_context() and admin_view() both ask.
        if not hasattr(request, "_may_use_admin"):
            request._may_use_admin = may_use_admin(request.user)
        return request._may_use_admin

    def get_urls(self) -> list[URLPattern]:
        # Django's "view on site" redirect (admin/r/<content type>/<id>/) loads any row of any
        # model by id and redirects to its get_absolute_url(): a way around owner scoping as
        # soon as a tenant model has one. Ours asks the model's admin for the row first.
        return [
            path(
                "r/<int:content_type_id>/<path:object_id>/",
                self.admin_view(self.scoped_view_on_site),
                name="view_on_site",
            )
            if getattr(pattern, "name", None) == "view_on_site"
            else pattern
            for pattern in super().get_urls()
        ]

    def scoped_view_on_site(
        self, request: HttpRequest, content_type_id: int, object_id: str
    ) -> HttpResponse:
        content_type = ContentType.objects.filter(pk=content_type_id).first()
        model = content_type.model_class() if content_type else None
        model_admin = self._registry.get(model) if model else None
        if model_admin is None or not model_admin.has_view_permission(request):
            raise Http404("No such object")
        # A scoped admin's get_object raises Http404 itself; others return None when missing.
        if model_admin.get_object(request, object_id) is None:
            raise Http404("No such object")
        return shortcut(request, content_type_id, object_id)
