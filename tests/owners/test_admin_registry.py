"""Every admin class that shows tenant rows goes through the one owner-scoping mixin."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.models import LogEntry

from apps.devices.models import Device, Telemetry
from apps.owners.admin_mixins import (
    OwnerScopedAdminMixin,
    owner_path,
    unscoped_relation_filters,
)
from apps.owners.admin_tabs import owner_tabs
from apps.owners.models import Membership, Owner


def _tenant_admins():
    for model, model_admin in admin.site._registry.items():
        if owner_path(model) is not None:
            yield model, model_admin


def _all_inlines():
    for model_admin in admin.site._registry.values():
        yield from ((model_admin, inline) for inline in model_admin.inlines)
    yield from ((None, tab.inline) for tab in owner_tabs() if tab.inline is not None)


def test_owner_path_finds_direct_and_indirect_owners():
    assert owner_path(Owner) == "pk"
    assert owner_path(Membership) == "owner"
    assert owner_path(Device) == "owner"
    assert owner_path(Telemetry) == "owner"  # the direct key wins over device__owner
    assert owner_path(LogEntry) is None


def test_the_registry_holds_the_tenant_models():
    # Guards the tests below against passing on an empty registry.
    registered = {model for model, _ in _tenant_admins()}
    assert {Owner, Device, Telemetry} <= registered


def test_every_tenant_model_admin_uses_the_scoping_mixin():
    offenders = [
        f"{model._meta.label}: {type(model_admin).__name__}"
        for model, model_admin in _tenant_admins()
        if not isinstance(model_admin, OwnerScopedAdminMixin)
    ]
    assert not offenders, f"not owner-scoped: {offenders}"


def test_every_tenant_inline_uses_the_scoping_mixin():
    offenders = [
        f"{inline.__name__} (on {type(parent).__name__ if parent else 'the owner page'})"
        for parent, inline in _all_inlines()
        if owner_path(inline.model) is not None and not issubclass(inline, OwnerScopedAdminMixin)
    ]
    assert not offenders, f"not owner-scoped: {offenders}"


def test_tenant_admins_filter_relations_only_through_scoped_filters():
    offenders = {
        type(model_admin).__name__: unscoped_relation_filters(model_admin)
        for _, model_admin in _tenant_admins()
        if unscoped_relation_filters(model_admin)
    }
    assert not offenders, f"these filters would list other owners' rows: {offenders}"


def test_tenant_admins_use_no_raw_id_fields():
    # A raw-id widget prints the name of whatever row an id points at, whoever owns it.
    offenders = [
        type(model_admin).__name__
        for _, model_admin in _tenant_admins()
        if model_admin.raw_id_fields
    ]
    assert not offenders
