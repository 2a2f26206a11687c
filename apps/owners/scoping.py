"""The one owner-scoping rule: admin, pages, sockets, API and tasks all go through here.

A member sees and changes only rows of owners they belong to; superusers see everything.
A lookup of another owner's object is a 404 (`get_for_user_or_404`), never a 403, so that
ids of other tenants cannot be probed.
"""

from __future__ import annotations

from typing import TypeVar

from django.db.models import Model, QuerySet
from django.http import Http404

from .models import ROLE_RANK, Membership, Owner, Role

M = TypeVar("M", bound=Model)


def owner_ids_for(user, minimum_role: str = Role.VIEWER) -> list[int] | None:
    """Ids of the owners `user` may act on with at least `minimum_role`; None means all."""
    if not user or not user.is_authenticated or not user.is_active:
        return []
    # An API key (apps.api.auth.ApiClient) acts for its one owner; its scopes, not roles, decide.
    key_owner_id = getattr(user, "api_key_owner_id", None)
    if key_owner_id is not None:
        return [key_owner_id]
    if user.is_superuser:
        return None
    allowed = [r for r, rank in ROLE_RANK.items() if rank >= ROLE_RANK[Role(minimum_role)]]
    return list(
        Membership.objects.filter(user=user, role__in=allowed).values_list("owner_id", flat=True)
    )


def owners_for(user, minimum_role: str = Role.VIEWER) -> QuerySet[Owner]:
    ids = owner_ids_for(user, minimum_role)
    qs = Owner.objects.all()
    return qs if ids is None else qs.filter(pk__in=ids)


def scope(
    qs: QuerySet[M], user, minimum_role: str = Role.VIEWER, field: str = "owner"
) -> QuerySet[M]:
    """Filter a queryset of tenant rows (with an `owner` foreign key, or `field`) by `user`."""
    ids = owner_ids_for(user, minimum_role)
    if ids is None:
        return qs
    return qs.filter(**{f"{field}_id__in": ids})


def get_for_user_or_404(qs: QuerySet[M], user, minimum_role: str = Role.VIEWER, **lookup) -> M:
    try:
        return scope(qs, user, minimum_role).get(**lookup)
    except qs.model.DoesNotExist:
        raise Http404("No such object") from None


def has_role(user, owner_id: int, minimum_role: str) -> bool:
    ids = owner_ids_for(user, minimum_role)
    return ids is None or owner_id in ids
