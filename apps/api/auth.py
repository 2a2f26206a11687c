"""Bearer authentication with API keys, scope checks and the per-key rate limit.

`request.user` of an API request is an `ApiClient`: the key, its owner and its scopes. The one
scoping rule (`apps.owners.scoping.owner_ids_for`) knows it acts for exactly its key's owner,
so every view scopes its querysets with `scope(qs, request.user)` like the admin does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db.models import Q
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from . import keys, ratelimit
from .models import ApiKey

# last_used_at is written at most this often per key: an UPDATE per request would turn every
# read into a write (and serialise SQLite writers) for a value nobody needs to the second.
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(eq=False)
class ApiClient:
    """The authenticated caller: one API key of one owner."""

    key: ApiKey
    scopes: frozenset[str] = field(default_factory=frozenset)

    # What Django and DRF ask of a user.
    is_authenticated = True
    is_active = True
    is_superuser = False
    is_staff = False
    is_anonymous = False

    @property
    def pk(self) -> int:
        return self.key.pk

    @property
    def owner_id(self) -> int:
        return self.key.owner_id

    @property
    def api_key_owner_id(self) -> int:
        """Read by `apps.owners.scoping.owner_ids_for`: this caller acts for this owner only."""
        return self.key.owner_id

    def get_username(self) -> str:
        return f"api-key:{self.key.prefix}"

    def __str__(self) -> str:
        return self.get_username()


class ApiKeyAuthentication(BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[ApiClient, ApiKey] | None:
        header = get_authorization_header(request).split()
        if not header:
            return None  # no credentials: NotAuthenticated (401) from the permission check
        if header[0].lower() != self.keyword.lower().encode():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <API key>'.")
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <API key>'.")
        try:
            token = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Malformed API key.")
        if not keys.well_formed(token):
            # Shape and checksum fail: no database lookup for typos, truncations and junk.
            raise exceptions.AuthenticationFailed("Malformed API key.")
        key = (
            ApiKey.objects.select_related("owner")
            .filter(digest=keys.digest(token), revoked_at__isnull=True)
            .first()
        )
        if key is None:
            # One answer for unknown and revoked keys: a revoked key is simply no key.
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        _note_use(key)
        return ApiClient(key=key, scopes=frozenset(key.scopes or [])), key

    def authenticate_header(self, request: Request) -> str:
        return f'{self.keyword} realm="api"'


def _note_use(key: ApiKey) -> None:
    now = timezone.now()
    if key.last_used_at and now - key.last_used_at < LAST_USED_RESOLUTION:
        return
    # Conditional: of concurrent requests only one writes, and never backwards in time.
    ApiKey.objects.filter(pk=key.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
    ).update(last_used_at=now)
    key.last_used_at = now


def client_of(request: Request) -> ApiClient:
    user = request.user
    if not isinstance(user, ApiClient):
        raise exceptions.NotAuthenticated()
    return user


# --- scopes ---------------------------------------------------------------------------------


def required_scopes(view: Any, request: Request) -> tuple[str, ...] | None:
    """The scopes that allow this request (any one of them); () = any valid key.

    Views declare `scopes = {action or method: scope or tuple}`; None means the view forgot,
    which the permission turns into a refusal (default deny)."""
    table = getattr(view, "scopes", None)
    if table is None:
        return None
    action = getattr(view, "action", None)
    needed = table.get(action) if action else None
    if needed is None:
        needed = table.get(request.method)
    if needed is None:
        return None
    return (needed,) if isinstance(needed, str) else tuple(needed)


class HasScope(BasePermission):
    """Authenticated with an API key that carries one of the route's scopes."""

    message = "This API key lacks the scope this route needs."

    def has_permission(self, request: Request, view: Any) -> bool:
        client = request.user
        if not isinstance(client, ApiClient):
            return False  # DRF answers 401 when there were no credentials at all
        needed = required_scopes(view, request)
        if needed is None:
            return False
        if not needed or client.scopes.intersection(needed):
            return True
        self.message = f"This API key lacks the scope {' or '.join(needed)}."
        return False


# --- rate limit -----------------------------------------------------------------------------


class ApiRateThrottle(BaseThrottle):
    """Per key and per owner (`API_RATE_PER_KEY`, `API_RATE_PER_OWNER` per window)."""

    window: ratelimit.Window | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        client = request.user
        if not isinstance(client, ApiClient):
            return True
        self.window = ratelimit.check_api(client.key.pk, client.owner_id)
        request.rate_window = self.window  # type: ignore[attr-defined]  # for the headers
        return self.window.allowed

    def wait(self) -> float | None:
        return self.window.retry_after() if self.window else None
