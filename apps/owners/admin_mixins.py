"""Owner scoping for the admin: ONE mixin for every tenant ModelAdmin and inline.

    from apps.owners.admin_mixins import OwnerScopedAdminMixin

    @admin.register(Destination)
    class DestinationAdmin(OwnerScopedAdminMixin, unfold.admin.ModelAdmin): ...

    class RunInline(OwnerScopedAdminMixin, unfold.admin.TabularInline): ...

The mixin goes first in the bases. `tests/owners/test_admin_registry.py` fails when a ModelAdmin
or inline of a model that reaches an Owner (directly, like `Device.owner`, or through a chain of
foreign keys, like `Schedule.device.owner`) does not use it.

Who may do what (members get in without Django model permissions)
------------------------------------------------------------------
Entering the admin is decided by `apps.owners.admin_site` (superusers and anyone with a
membership). Past the door, tenant admins ignore Django's model permissions and ask the
membership roles, through the single scoping rule in `apps.owners.scoping`:

    viewer     sees the rows of their owners (read-only change pages)
    operator   + device actions (`has_operate_permission`, for `@action(permissions=["operate"])`)
    admin      + add, change, delete rows of their owners
    owner      + as admin; only owners grant or take away the owner role (members inline)

A class can move the bar with `view_role`, `operate_role` and `change_role`. Superusers see and
change everything, including rows without an owner (e.g. quarantined messages of unknown devices).

What is scoped
--------------
- `get_queryset` (changelists, change pages, actions, unfold's global search, and the
  autocomplete endpoint, which asks the *target* model's admin for its queryset);
- `get_object`: another owner's row is exactly a missing row, a 404 — never Django's
  "doesn't exist" redirect, which would differ from nothing only by its wording;
- foreign-key and many-to-many form choices: owners the user may change, tenant rows of those
  owners, and users who share an owner with them (never the whole user table); the owner field is
  preselected and hidden when there is exactly one owner to choose;
- related list filters (`get_list_filter` swaps plain relation filters for scoped ones, and hides
  the owner filter from someone with a single owner);
- `get_search_results`, again, so a custom search cannot widen the set;
- permissions, per object: for an inline, `obj` is the parent, so the parent's owner decides;
- admin actions: each runs on the selected rows where the user holds the role its
  `permissions` ask for (Django checks them only once, at model level);
- delete confirmations: counts per model instead of every cascaded row, without asking the
  read-only log admins for a delete permission they never grant.

unfold's own actions (`actions_row`, `actions_detail`) receive an object id, not a queryset:
load the row with `self.get_object(request, object_id)`, which is scoped, before acting.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin import RelatedFieldListFilter, RelatedOnlyFieldListFilter
from django.contrib.admin.utils import get_fields_from_path
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import router
from django.db.models import Model, ProtectedError, Q, QuerySet, RestrictedError
from django.db.models.deletion import Collector
from django.http import Http404, HttpRequest
from unfold.contrib.filters.admin import AutocompleteSelectFilter, RelatedDropdownFilter
from unfold.contrib.filters.forms import AutocompleteDropdownForm

from .models import ROLE_RANK, Owner, Role
from .scoping import owner_ids_for, scope

# How far `owner_path` follows foreign keys looking for the owner (Telemetry → Device → Owner
# is two hops; nothing in the platform is deeper).
MAX_OWNER_HOPS = 3


# --- the path from a model to its owner ----------------------------------------------------------


def owner_path(model: type[Model]) -> str | None:
    """The ORM lookup from `model` to its Owner: "pk" for Owner itself, "owner" for a row with
    an owner foreign key, "device__owner" for one that reaches it through its device; None when
    the model is not tenant data (users, groups, beat tables). The shortest path wins, so a
    direct `owner` key is preferred over one through a parent."""
    if model is Owner:
        return "pk"
    frontier: list[tuple[type[Model], str]] = [(model, "")]
    seen = {model}
    for _hop in range(MAX_OWNER_HOPS):
        next_frontier = []
        for current, prefix in frontier:
            for field in current._meta.concrete_fields:
                if not (field.many_to_one or field.one_to_one):
                    continue
                target = field.related_model
                if target is Owner:
                    return f"{prefix}{field.name}"
                if target not in seen:
                    seen.add(target)
                    next_frontier.append((target, f"{prefix}{field.name}__"))
        frontier = next_frontier
    return None


def owner_id_of(obj: Model) -> int | None:
    """The owner id of a tenant row (follows `owner_path`; None for a row without owner)."""
    path = owner_path(type(obj))
    if path is None:
        return None
    if path == "pk":
        return obj.pk
    *hops, last = path.split("__")
    current: Any = obj
    for hop in hops:
        current = getattr(current, hop, None)
        if current is None:
            return None
    return getattr(current, f"{last}_id")


def scope_by_path(qs: QuerySet, user: Any, path: str, minimum_role: str = Role.VIEWER) -> QuerySet:
    """`apps.owners.scoping.scope` for any owner path, including Owner itself ("pk")."""
    if path == "pk":
        ids = owner_ids_for(user, minimum_role)
        return qs if ids is None else qs.filter(pk__in=ids)
    return scope(qs, user, minimum_role, field=path)


def _owner_ids(request: HttpRequest, role: str) -> list[int] | None:
    """`owner_ids_for` cached on the request: a change page asks for permissions many times."""
    cache = request.__dict__.setdefault("_owner_ids_by_role", {})
    if role not in cache:
        cache[role] = owner_ids_for(request.user, role)
    return cache[role]


def scoped_choices(
    model: type[Model], request: HttpRequest, minimum_role: str = Role.VIEWER
) -> QuerySet | None:
    """The rows of `model` the user may pick in a form or filter; None when `model` is not
    scoped (then the caller keeps Django's default)."""
    qs = model._default_manager.all()
    if model._meta.label == settings.AUTH_USER_MODEL:
        # People who share an owner with the user: a tenant admin must not browse all accounts.
        ids = _owner_ids(request, Role.VIEWER)
        return qs if ids is None else qs.filter(memberships__owner_id__in=ids).distinct()
    path = owner_path(model)
    if path is None:
        return None
    return scope_by_path(qs, request.user, path, minimum_role)


# --- scoped list filters -------------------------------------------------------------------------


class OwnerScopedRelatedFilter(RelatedDropdownFilter):
    """A relation filter whose choices are only what the user may see.

    Django's RelatedFieldListFilter lists every row of the related table: another owner's device
    and owner names would leak into the filter sidebar."""

    def field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> list[tuple]:
        choices = scoped_choices(field.related_model, request)
        if choices is None:
            # Not tenant data: offer only values present in the (scoped) rows of this list.
            return RelatedOnlyFieldListFilter.field_choices(self, field, request, model_admin)
        ordering = self.field_admin_ordering(field, request, model_admin)
        return field.get_choices(
            include_blank=False,
            ordering=ordering,
            limit_choices_to=Q(pk__in=choices.values("pk")),
        )


class _ScopedAutocompleteForm(AutocompleteDropdownForm):
    def __init__(self, request: HttpRequest, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(request, name, *args, **kwargs)
        # unfold builds the choice on `Model.objects`: the selected value's label would be
        # looked up in every owner's rows (`?device__id__exact=<foreign id>` shows its name).
        choices = scoped_choices(kwargs["field"].related_model, request)
        if choices is not None:
            self.fields[name].queryset = choices


class OwnerScopedAutocompleteFilter(AutocompleteSelectFilter):
    """unfold's autocomplete filter with scoped choices, for relations with many rows (devices)."""

    form_class = _ScopedAutocompleteForm


SCOPED_FILTERS = (OwnerScopedRelatedFilter, OwnerScopedAutocompleteFilter)


# --- the mixin -----------------------------------------------------------------------------------


class OwnerScopedAdminMixin:
    """Scope a ModelAdmin or inline to the request user's owners. See the module docstring."""

    # The lookup to the owner; None finds it (`owner_path`). Set it when a model reaches an
    # owner by two paths and the shortest is not the one that decides.
    owner_field: str | None = None
    view_role: str = Role.VIEWER
    operate_role: str = Role.OPERATOR
    change_role: str = Role.ADMIN

    model: type[Model]

    # -- which rows --------------------------------------------------------------------------

    def get_owner_path(self) -> str:
        path = self.owner_field or owner_path(self.model)
        if path is None:
            raise ImproperlyConfigured(
                f"{type(self).__name__}: {self.model._meta.label} does not reach an Owner; "
                "set owner_field or do not use OwnerScopedAdminMixin for it"
            )
        return path

    def scope_queryset(self, request: HttpRequest, qs: QuerySet) -> QuerySet:
        return scope_by_path(qs, request.user, self.get_owner_path(), self.view_role)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return self.scope_queryset(request, super().get_queryset(request))

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None):
        obj = super().get_object(request, object_id, from_field)
        if obj is None:
            # Same answer for "someone else's" and "never existed": ids cannot be probed.
            raise Http404("No such object")
        return obj

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        queryset, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        return self.scope_queryset(request, queryset), may_have_duplicates

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        """What a delete would remove, as counts per model.

        Django's version lists every cascaded row (it loads them all: a device with a year of
        telemetry would never render) and asks each related model's admin for delete permission
        (read-only logs say no, so a device with history could not be deleted at all). Deleting
        a row deletes its own history by design; the permission that matters is on the rows
        chosen, checked below one by one."""
        objs = list(objs)
        collector = Collector(using=router.db_for_write(self.model))
        try:
            collector.collect(objs)
        except ProtectedError as exc:
            return [], {}, set(), [str(obj) for obj in list(exc.protected_objects)[:100]]
        except RestrictedError as exc:
            return [], {}, set(), [str(obj) for obj in list(exc.restricted_objects)[:100]]
        counts: Counter[str] = Counter()
        for model, instances in collector.data.items():
            counts[str(model._meta.verbose_name_plural)] += len(instances)
        for queryset in collector.fast_deletes:
            counts[str(queryset.model._meta.verbose_name_plural)] += queryset.count()
        counts = Counter({name: n for name, n in counts.items() if n})
        chosen = str(self.model._meta.verbose_name_plural)
        summary = [f"{name}: {n:,}" for name, n in sorted(counts.items()) if name != chosen]
        # Per chosen row, as Django does: a bulk delete is only checked at model level before.
        perms_needed = {
            str(self.model._meta.verbose_name)
            for obj in objs
            if not self.has_delete_permission(request, obj)
        }
        return [*(str(obj) for obj in objs), *summary], dict(counts), perms_needed, []

    # -- actions -----------------------------------------------------------------------------

    def get_actions(self, request: HttpRequest) -> dict:
        """Each action runs on the selected rows the user holds the action's role for.

        Django checks an action's `permissions` once, at model level: a user who administers
        one owner and only views another would otherwise delete (or switch) the other's rows
        by selecting them. An action without declared permissions needs `change_role`."""
        return {
            name: (self._scoped_action(func), name, description)
            for name, (func, _name, description) in super().get_actions(request).items()
        }

    def role_for_permission(self, permission: str) -> str:
        return {"view": self.view_role, "operate": self.operate_role}.get(
            permission, self.change_role
        )

    def _scoped_action(self, func: Any) -> Any:
        roles = [self.role_for_permission(p) for p in getattr(func, "allowed_permissions", ())]
        role = max(roles or [self.change_role], key=lambda r: ROLE_RANK[Role(r)])
        path = self.get_owner_path()

        @functools.wraps(func)
        def scoped(modeladmin: Any, request: HttpRequest, queryset: QuerySet) -> Any:
            return func(modeladmin, request, scope_by_path(queryset, request.user, path, role))

        return scoped

    # -- who may do what ---------------------------------------------------------------------

    def has_role(self, request: HttpRequest, role: str, obj: Any = None) -> bool:
        """Whether the user has `role` on `obj`'s owner (on any owner when obj is None).

        unfold passes a detail action's object id (a string) where Django passes the object;
        that is answered at model level — the action itself loads the row via get_object."""
        user = request.user
        if not (user.is_authenticated and user.is_active):
            return False
        if user.is_superuser:
            return True
        ids = _owner_ids(request, role)
        if not isinstance(obj, Model):
            return bool(ids)
        owner_id = owner_id_of(obj)
        return owner_id is not None and owner_id in ids

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_role(request, self.view_role)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_role(request, self.view_role, obj)

    def has_operate_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_role(request, self.operate_role, obj)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # ModelAdmin calls this with the request only; an inline passes its parent.
        return self.has_role(request, self.change_role, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_role(request, self.change_role, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_role(request, self.change_role, obj)

    # -- form choices ------------------------------------------------------------------------

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any):
        related = db_field.related_model
        if "queryset" not in kwargs:
            if related is Owner:
                # Only owners where the user may create/change rows, not merely look.
                kwargs["queryset"] = scoped_choices(Owner, request, self.change_role)
                self._preselect_single_owner(request, kwargs)
            else:
                choices = scoped_choices(related, request)
                if choices is not None:
                    kwargs["queryset"] = choices
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def _preselect_single_owner(self, request: HttpRequest, kwargs: dict[str, Any]) -> None:
        if request.user.is_superuser:
            return
        owners = list(kwargs["queryset"][:2])
        if len(owners) == 1:
            # Hidden, not excluded: the value still goes through the restricted queryset (a
            # tampered id fails validation) and through model validation of constraints.
            kwargs.setdefault("initial", owners[0].pk)
            kwargs["widget"] = forms.HiddenInput()

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any):
        if "queryset" not in kwargs:
            choices = scoped_choices(db_field.related_model, request)
            if choices is not None:
                kwargs["queryset"] = choices
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    # -- lists -------------------------------------------------------------------------------

    def get_list_display(self, request: HttpRequest) -> Any:
        columns = super().get_list_display(request)
        if self._has_several_owners(request):
            return columns
        # One owner: a column repeating its name on every row is noise.
        return [column for column in columns if column != "owner"]

    # -- list filters ------------------------------------------------------------------------

    def get_list_filter(self, request: HttpRequest) -> list:
        scoped = []
        for item in super().get_list_filter(request):
            if not isinstance(item, str):
                scoped.append(item)
                continue
            try:
                field = get_fields_from_path(self.model, item)[-1]
            except (FieldDoesNotExist, ImproperlyConfigured):
                scoped.append(item)
                continue
            if not field.is_relation:
                scoped.append(item)
            elif field.related_model is Owner and not self._has_several_owners(request):
                continue  # one owner: the filter could only say what the page already shows
            else:
                scoped.append((item, OwnerScopedRelatedFilter))
        return scoped

    def _has_several_owners(self, request: HttpRequest) -> bool:
        ids = _owner_ids(request, self.view_role)
        return ids is None or len(ids) > 1


def unscoped_relation_filters(model_admin: Any) -> list[str]:
    """Relation list filters of `model_admin` that would list other owners' rows (for tests)."""
    bad = []
    for item in model_admin.list_filter:
        if isinstance(item, tuple | list):
            name, filter_class = item[0], item[1]
            if issubclass(filter_class, RelatedFieldListFilter) and not issubclass(
                filter_class, SCOPED_FILTERS
            ):
                bad.append(name)
    return bad
