"""Relation fields whose choices are the key's owner's rows only.

A reference to another owner's row in a request body is answered exactly like a reference to
a row that does not exist ("does not exist"), never "belongs to someone else"."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework import serializers

from apps.owners.scoping import scope


class _Scoped:
    owner_field = "owner"

    def get_queryset(self) -> QuerySet:
        qs = super().get_queryset()  # type: ignore[misc]
        request = self.context.get("request")  # type: ignore[attr-defined]
        return scope(qs, getattr(request, "user", None), field=self.owner_field)


class ScopedSlugRelatedField(_Scoped, serializers.SlugRelatedField):
    pass


class ScopedPrimaryKeyRelatedField(_Scoped, serializers.PrimaryKeyRelatedField):
    pass


def device_ref(**kwargs: Any) -> ScopedSlugRelatedField:
    from apps.devices.models import Device

    return ScopedSlugRelatedField(slug_field="device_id", queryset=Device.objects.all(), **kwargs)
