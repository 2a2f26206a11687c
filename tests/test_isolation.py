"""Tenant isolation, proven over every route and every model of the product.

1. Every model either reaches an Owner (`owner_path`) or is on NON_TENANT_MODELS with a reason.
2. Every URL pattern (admin, pages, API) and every WebSocket route is either on PUBLIC_ROUTES /
   OPERATOR_ROUTES with a reason, or checked here:
   - a route that takes an object id is called by alice (session or API key) with *charlie's*
     id, by GET and by its mutating methods: the answer is 404 and none of charlie's rows change;
   - a route that lists is called by alice, plain and with searches and filters naming charlie's
     rows: nothing of charlie's appears (every charlie row carries "charlie"; alice's never do);
   - admin autocomplete, for every relation an admin form can offer, returns none of his rows.
3. `test_the_checker_catches_a_view_that_forgets_its_scope` removes the scoping from one view
   of each kind (API, admin, page) and asserts the checker reports it: these tests would fail.

A route or model added without a decision fails `test_every_route_is_checked_or_allowed` or
`test_every_model_is_tenant_data_or_allowed` with its name.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.contenttypes.models import ContentType
from django.db.models import Model
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from apps.api.actions import create_api_key
from apps.api.models import ALL_SCOPES, IdempotencyRecord, IdempotencyState
from apps.devices.models import DeviceCredential, QuarantinedMessage, QuarantineReason
from apps.devices.routing import websocket_urlpatterns
from apps.forwarding import kinds
from apps.forwarding.models import AlertKind, DeliveryAlert
from apps.owners.admin_mixins import OwnerScopedAdminMixin, owner_path, scope_by_path
from apps.owners.models import Owner
from tests.api.conftest import ApiClient
from tests.api.world import Side, build_side
from tests.devices.live_helpers import ALL_DATABASES

# --- decisions: what is not tenant data, and which routes need no owner scoping ----------------

NON_TENANT_MODELS = {
    "accounts.User": "people; a tenant admin reaches them only through memberships",
    "auth.Group": "operators only (SuperuserOnlyMixin)",
    "auth.Permission": "Django's permission catalogue",
    "contenttypes.ContentType": "model catalogue",
    "sessions.Session": "login sessions, never listed",
    "admin.LogEntry": "admin history; shown only through scoped object history pages",
    "api.RateCounter": "request counts per bucket, no tenant data",
}
NON_TENANT_APPS = {
    "django_celery_beat": "beat's schedule of platform tasks",
    "channels_lite": "channel layer messages (the consumer scopes what it sends)",
}

PUBLIC_ROUTES = {
    "healthz": "liveness, no data",
    "readyz": "readiness, no tenant data",
    "metrics": "platform totals for Prometheus, behind METRICS_TOKEN",
    "api:schema": "the API's description",
    "api:docs": "docs page (static assets)",
    "api:redoc": "docs page (static assets)",
    "api:not-found": "JSON 404 for unknown API paths",
    "admin:login": "login form",
    "admin:logout": "logout",
    "admin:password_change": "the user's own password",
    "admin:password_change_done": "a message",
    "admin:jsi18n": "translations",
    "admin:index": "the list of admin pages, no rows",
    "admin:app_list": "the list of an app's admin pages, no rows",
}
# Operator-only pages: checked to refuse a tenant member (alice) outright.
OPERATOR_APPS = ("accounts", "auth", "django_celery_beat")

OBJECT_KWARGS = ("object_id", "pk", "device_id", "id", "content_type_id")


# --- enumeration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str  # namespace:name, or "ws:<path>" for WebSocket routes
    pattern: str
    kwargs: tuple[str, ...]
    callback: Any


def _walk(patterns: list, prefix: str = "", namespace: str = "") -> Iterator[Route]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            ns = entry.namespace or ""
            full_ns = ":".join(p for p in (namespace, ns) if p)
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern), full_ns)
        elif isinstance(entry, URLPattern):
            name = entry.name or f"<unnamed {prefix}{entry.pattern}>"
            full = f"{namespace}:{name}" if namespace else name
            kwargs = tuple(entry.pattern.regex.groupindex)
            # Router patterns are regexes ("^devices/…$"): keep the path readable.
            path = (prefix + str(entry.pattern)).replace("^", "").replace("$", "")
            yield Route(full, path, kwargs, entry.callback)


def http_routes() -> list[Route]:
    unique: dict[tuple[str, str], Route] = {}
    for route in _walk(get_resolver().url_patterns):
        unique.setdefault((route.name, route.pattern), route)
    return list(unique.values())


def ws_routes() -> list[Route]:
    return [Route(f"ws:{p.pattern}", str(p.pattern), (), p.callback) for p in websocket_urlpatterns]


def _admin_model(route: Route) -> type[Model] | None:
    if not route.name.startswith("admin:"):
        return None
    for model in admin.site._registry:
        label = f"admin:{model._meta.app_label}_{model._meta.model_name}_"
        if route.name.startswith(label):
            return model
    return None


def classify(route: Route) -> str:
    """public | operator | admin-model | admin-autocomplete | admin-view-on-site | api | page."""
    if route.name in PUBLIC_ROUTES:
        return "public"
    if route.name == "admin:autocomplete":
        return "admin-autocomplete"
    if route.name == "admin:view_on_site":
        return "admin-view-on-site"
    if route.name == "admin:search":
        return "admin-search"
    # Django's own: `<model>/<id>/` redirects to `<model>/<id>/change/` whatever the id (the
    # change view then decides), and the catch-all answers 404 or adds a slash.
    if route.name.startswith("admin:<unnamed") and route.pattern.endswith(
        ("<path:object_id>/", "(?P<url>.*)")
    ):
        return "public"
    if route.name.startswith("admin:auth_user_"):
        return "operator"  # UserAdmin names its password page after auth.User
    model = _admin_model(route)
    if model is not None:
        return "operator" if model._meta.app_label in OPERATOR_APPS else "admin-model"
    if route.name.startswith("api:"):
        return "api"
    if route.name in ("dashboard", "device-detail", "device-command"):
        return "page"
    if route.name.startswith("ws:"):
        return "socket"
    return "unknown"


# --- the world --------------------------------------------------------------------------------


@dataclass
class World:
    alice_side: Side
    charlie_side: Side
    alice_owner: Owner
    charlie_owner: Owner
    alice: Any
    charlie: Any
    alice_token: str

    def charlie_row(self, model: type[Model]) -> Model | None:
        """One of charlie's rows of `model` (the world holds one of every tenant model)."""
        path = owner_path(model)
        if path is None:
            return None
        lookup = "pk" if path == "pk" else f"{path}_id"
        return model._default_manager.filter(**{lookup: self.charlie_owner.pk}).first()


def build_world(alice_owner, charlie_owner, alice, charlie) -> World:
    alice_side = build_side(alice_owner, "alice")
    charlie_side = build_side(charlie_owner, "charlie")
    for owner, side, name in ((charlie_owner, charlie_side, "charlie"),):
        QuarantinedMessage.objects.create(
            received_at=timezone.now(),
            topic=f"home/{side.lamp.device_id}/status",
            reason=QuarantineReason.MALFORMED,
            detail=f"{name} garbage",
            payload=b"{",
            size=1,
            owner=owner,
            device=side.lamp,
        )
        DeviceCredential.objects.create(
            owner=owner, device=side.lamp, username=f"{name}-cred", password="s3cret-pass"
        )
        DeliveryAlert.objects.create(
            owner=owner,
            destination=side.webhook,
            kind=AlertKind.FAILING,
            message=f"{name} hook keeps failing",
        )
        key, _ = create_api_key(owner, f"{name} key", ALL_SCOPES)
        IdempotencyRecord.objects.create(
            owner=owner,
            api_key=key,
            key=f"{name}-idem",
            fingerprint="0" * 64,
            method="POST",
            path="/api/v1/devices/",
            state=IdempotencyState.DONE,
            claim="c" * 32,
            claimed_at=timezone.now(),
            body=f'{{"{name}": 1}}',
        )
    _key, token = create_api_key(alice_owner, "alice key", ALL_SCOPES)
    world = World(alice_side, charlie_side, alice_owner, charlie_owner, alice, charlie, token)
    fill_missing(world)
    return world


def fill_missing(world: World) -> None:
    """A charlie row of every tenant model the sides above do not build (models added later,
    such as further delivery kinds), made from the model's fields alone."""
    pending = [
        m for m in apps.get_models() if owner_path(m) is not None and world.charlie_row(m) is None
    ]
    for _round in range(len(pending) + 1):
        if not pending:
            return
        still = []
        for model in pending:
            values = _field_values(model, world)
            if values is None:
                still.append(model)  # a related row is not there yet: next round
                continue
            model(**values).save()
        pending = still


def _field_values(model: type[Model], world: World) -> dict[str, Any] | None:
    from django.db import models as m

    values: dict[str, Any] = {}
    for field in model._meta.concrete_fields:
        if field.primary_key or field.has_default() or field.null:
            continue
        if field.is_relation:
            if field.related_model is Owner:
                values[field.attname] = world.charlie_owner.pk
                continue
            related = world.charlie_row(field.related_model)
            if related is None:
                return None
            values[field.attname] = related.pk
        elif field.choices:
            values[field.attname] = field.choices[0][0]
        elif isinstance(field, m.CharField | m.TextField):
            values[field.attname] = f"charlie-{field.name}"[: field.max_length or 100]
        elif isinstance(field, m.BooleanField):
            values[field.attname] = False
        elif isinstance(field, m.IntegerField | m.FloatField | m.DecimalField):
            values[field.attname] = 1
        elif isinstance(field, m.DateTimeField):
            values[field.attname] = timezone.now()
        elif isinstance(field, m.DateField):
            values[field.attname] = timezone.now().date()
        elif isinstance(field, m.JSONField):
            values[field.attname] = {}
        elif isinstance(field, m.BinaryField):
            values[field.attname] = b"charlie"
        elif isinstance(field, m.UUIDField):
            values[field.attname] = uuid.uuid4()
    return values


@pytest.fixture
def world(db, alice_owner, charlie_owner, alice, charlie) -> World:
    return build_world(alice_owner, charlie_owner, alice, charlie)


def charlie_snapshot(world: World) -> str:
    """A digest of every tenant row of charlie's: equal before and after = nothing changed."""
    digest = hashlib.sha256()
    for model in sorted(apps.get_models(), key=lambda m: m._meta.label):
        path = owner_path(model)
        if path is None:
            continue
        qs = scope_by_path(model._default_manager.all(), world.charlie, path).order_by("pk")
        fields = [f.attname for f in model._meta.concrete_fields]
        for row in qs.values_list(*fields):
            digest.update(repr((model._meta.label, row)).encode())
    return digest.hexdigest()


# --- the checker ------------------------------------------------------------------------------

LEAK = re.compile(r"charlie", re.IGNORECASE)


def _session(world: World) -> Client:
    client = Client()
    client.force_login(world.alice)
    return client


def _body_leaks(response: Any) -> bool:
    if getattr(response, "streaming", False):
        content = b"".join(response.streaming_content)
    else:
        content = response.content
    return bool(LEAK.search(content.decode("utf-8", errors="replace")))


def _api_object_url(route: Route, world: World) -> str | None:
    """The route's URL with charlie's object in it (None for routes without an object)."""
    ids = world.charlie_side.ids()
    values: dict[str, str] = {}
    for kwarg in route.kwargs:
        if kwarg == "device_id":
            values[kwarg] = ids["device"]
        elif kwarg in ("id", "pk"):
            kind = re.match(r"api/v1/destinations/(\w+)/", route.pattern)
            if kind and kind.group(1) in kinds.KINDS:
                row = world.charlie_row(kinds.KINDS[kind.group(1)].model)
                values[kwarg] = str(row.uuid) if row is not None else ""
                continue
            for part, key in (
                ("commands", "command"),
                ("groups", "group"),
                ("schedules", "schedule"),
                ("deliveries", "delivery"),
                ("destinations", "destination"),
            ):
                if route.pattern.startswith(f"api/v1/{part}/"):
                    values[kwarg] = ids[key]
                    break
        elif kwarg == "format":
            continue
    if not values:
        return None
    if len(values) != len([k for k in route.kwargs if k != "format"]) or "" in values.values():
        raise AssertionError(f"do not know which of charlie's objects {route.name} takes")
    return _reverse(route, values)


def _reverse(route: Route, values: dict[str, str]) -> str:
    from django.urls import reverse

    return reverse(route.name, kwargs=values)


def check_route(route: Route, world: World) -> list[str]:
    """Violations of the isolation rule by one route (empty = isolated)."""
    kind = classify(route)
    if kind == "api":
        return _check_api(route, world)
    if kind == "admin-model":
        return _check_admin(route, world)
    if kind == "page":
        return _check_page(route, world)
    if kind == "operator":
        return _check_operator(route, world)
    if kind == "admin-view-on-site":
        return _check_view_on_site(world)
    if kind == "admin-autocomplete":
        return _check_autocomplete(world)
    if kind == "admin-search":
        response = _session(world).get("/admin/search/", {"s": "harli"})
        return ["admin search shows charlie's rows"] if _body_leaks(response) else []
    return []


def _object_checks(
    client: Any, url: str, world: World, label: str, methods: list[str]
) -> list[str]:
    problems: list[str] = []
    statuses: list[int] = []
    before = charlie_snapshot(world)
    for method in methods:
        if isinstance(client, ApiClient):
            response = client.request(
                method,
                url,
                {} if method in ("POST", "PUT", "PATCH") else None,
                idem=f"iso-{uuid.uuid4().hex}" if method != "GET" else None,
            )
        else:
            response = getattr(client, method.lower())(
                url, {"post": "yes"} if method == "POST" else None
            )
        statuses.append(response.status_code)
        # 405: the route does not serve this method at all, which reveals nothing.
        if response.status_code not in (404, 405):
            problems.append(f"{label}: {method} with charlie's object gave {response.status_code}")
    if 404 not in statuses:
        problems.append(f"{label}: no method answered 404 ({statuses})")
    if charlie_snapshot(world) != before:
        problems.append(f"{label}: charlie's rows changed")
    return problems


def _check_api(route: Route, world: World) -> list[str]:
    api = ApiClient(world.alice_token)
    url = _api_object_url(route, world)
    methods = _api_methods(route)
    if url is not None:
        return _object_checks(api, url, world, route.name, methods)
    problems = []
    from django.urls import reverse

    url = reverse(route.name)
    if "GET" in methods:
        for query in ("", "?device=" + world.charlie_side.lamp.device_id, "?status=failed"):
            response = api.get(url + query)
            if response.status_code >= 500 or _body_leaks(response):
                problems.append(f"{route.name}{query}: shows charlie's rows")
    return problems


def _api_methods(route: Route) -> list[str]:
    view = route.callback
    actions = getattr(view, "actions", None)
    if actions:
        return sorted(m.upper() for m in actions if m != "head")
    cls = getattr(view, "view_class", None) or getattr(view, "cls", None)
    return sorted(m.upper() for m in ("get", "post", "put", "patch", "delete") if hasattr(cls, m))


def _check_admin(route: Route, world: World) -> list[str]:
    model = _admin_model(route)
    assert model is not None
    client = _session(world)
    if "owner_id" in route.kwargs:  # a per-owner admin page (e.g. a tab reloaded by htmx)
        url = _reverse(route, {"owner_id": str(world.charlie_owner.pk)})
        return _object_checks(client, url, world, route.name, ["GET"])
    if "object_id" in route.kwargs or "pk" in route.kwargs:
        row = world.charlie_row(model)
        if row is None:
            return [
                f"{route.name}: the isolation world has no row of charlie's {model._meta.label}"
            ]
        kwarg = "object_id" if "object_id" in route.kwargs else "pk"
        url = _reverse(route, {kwarg: str(row.pk)})
        return _object_checks(client, url, world, route.name, ["GET", "POST"])
    from django.urls import reverse

    url = reverse(route.name)
    problems = []
    # "harli" finds charlie's rows by substring without the page echoing the marker itself.
    queries = [
        "",
        "?q=harli",
        f"?owner__id__exact={world.charlie_owner.pk}",
        f"?device__id__exact={world.charlie_side.lamp.pk}",
    ]
    for query in queries:
        response = client.get(url + query)
        if response.status_code == 200 and _body_leaks(response):
            problems.append(f"{route.name}{query}: shows charlie's rows")
    return problems


def _check_page(route: Route, world: World) -> list[str]:
    client = _session(world)
    if "device_id" in route.kwargs:
        url = _reverse(route, {"device_id": world.charlie_side.lamp.device_id})
        return _object_checks(client, url, world, route.name, ["GET", "POST"])
    from django.urls import reverse

    response = client.get(reverse(route.name))
    return [f"{route.name}: shows charlie's rows"] if _body_leaks(response) else []


def _check_operator(route: Route, world: World) -> list[str]:
    if route.kwargs:
        return []  # the changelist check below covers the model's admin for members
    from django.urls import reverse

    response = _session(world).get(reverse(route.name))
    if response.status_code not in (302, 403, 404):
        return [f"{route.name}: a tenant member got {response.status_code}"]
    return []


def _check_view_on_site(world: World) -> list[str]:
    from django.urls import reverse

    device = world.charlie_side.lamp
    url = reverse(
        "admin:view_on_site",
        args=[ContentType.objects.get_for_model(type(device)).pk, device.pk],
    )
    response = _session(world).get(url)
    return [] if response.status_code == 404 else [f"view_on_site gave {response.status_code}"]


def _check_autocomplete(world: World) -> list[str]:
    """Every relation field of every scoped admin, searched for "charlie"."""
    from django.urls import reverse

    client = _session(world)
    problems = []
    for model, model_admin in admin.site._registry.items():
        if not isinstance(model_admin, OwnerScopedAdminMixin):
            continue
        for field in model._meta.get_fields():
            if not (getattr(field, "is_relation", False) and field.concrete):
                continue
            target_admin = admin.site._registry.get(field.related_model)
            if target_admin is None or not target_admin.get_search_fields(None):
                continue
            response = client.get(
                reverse("admin:autocomplete"),
                {
                    "app_label": model._meta.app_label,
                    "model_name": model._meta.model_name,
                    "field_name": field.name,
                    "term": "harli",
                },
            )
            if response.status_code == 200 and _body_leaks(response):
                problems.append(f"autocomplete {model._meta.label}.{field.name} shows charlie")
    return problems


# --- the tests ---------------------------------------------------------------------------------


def test_every_model_is_tenant_data_or_allowed():
    undecided = [
        model._meta.label
        for model in apps.get_models()
        if owner_path(model) is None
        and model._meta.label not in NON_TENANT_MODELS
        and model._meta.app_label not in NON_TENANT_APPS
    ]
    assert not undecided, f"models without an owner and without a reason: {undecided}"


def test_every_route_is_checked_or_allowed():
    routes = http_routes() + ws_routes()
    assert len(routes) > 50  # the walk found the URL tree
    unknown = [r.name for r in routes if classify(r) == "unknown"]
    assert not unknown, f"routes neither checked nor allowed: {unknown}"


def test_the_world_holds_charlie_rows_of_every_tenant_model(world):
    missing = [
        model._meta.label
        for model in apps.get_models()
        if owner_path(model) is not None and world.charlie_row(model) is None
    ]
    assert not missing, f"add charlie rows of these to the isolation world: {missing}"


def test_api_routes_are_views_of_the_scoped_base():
    from apps.api.base import ApiViewMixin

    for route in http_routes():
        if classify(route) != "api" or route.name in PUBLIC_ROUTES:
            continue
        cls = getattr(route.callback, "cls", None) or getattr(route.callback, "view_class", None)
        assert cls is not None and issubclass(cls, ApiViewMixin), route.name


ROUTES = [r for r in http_routes() + ws_routes() if classify(r) not in ("public", "socket")]
KINDS_OF_ROUTES = sorted({classify(r) for r in ROUTES})


@pytest.mark.parametrize("kind", KINDS_OF_ROUTES)
def test_alice_never_reaches_charlies_rows(kind, world):
    # One world per kind of route (building it is what costs): every violation is listed.
    routes = [r for r in ROUTES if classify(r) == kind]
    assert routes
    violations = [problem for route in routes for problem in check_route(route, world)]
    assert violations == [], "\n".join(violations)


UNSCOPED = {
    "api:device-detail": (
        "apps.api.resources.devices.DeviceViewSet.get_queryset",
        lambda self: __import__("apps.devices.models", fromlist=["Device"]).Device.objects.all(),
    ),
    "admin:devices_device_change": (
        "apps.devices.admin.DeviceAdmin.get_queryset",
        lambda self, request: __import__(
            "apps.devices.models", fromlist=["Device"]
        ).Device.objects.all(),
    ),
    "device-detail": (
        "apps.devices.views.get_for_user_or_404",
        lambda qs, user, minimum_role=None, **lookup: qs.get(**lookup),
    ),
}


@pytest.mark.parametrize("name", sorted(UNSCOPED))
def test_the_checker_catches_a_view_that_forgets_its_scope(name, world, monkeypatch):
    target, unscoped = UNSCOPED[name]
    route = next(r for r in http_routes() if r.name == name)
    assert check_route(route, world) == []  # scoped: no violation
    monkeypatch.setattr(target, unscoped)
    assert check_route(route, world), f"removing the scope of {name} went unnoticed"


@pytest.mark.django_db(transaction=True, databases=ALL_DATABASES)
def test_the_live_socket_sends_alice_nothing_of_charlies(
    alice_owner, charlie_owner, alice, charlie, settings
):
    from asgiref.sync import async_to_sync

    from tests.devices.live_helpers import communicator, isolated_layer_config, session_cookie

    settings.CHANNEL_LAYERS = isolated_layer_config()
    world = build_world(alice_owner, charlie_owner, alice, charlie)
    cookie = session_cookie(alice)

    async def scenario() -> list[Any]:
        socket = communicator(cookie)
        connected, _ = await socket.connect(timeout=5)
        assert connected
        snapshot = await socket.receive_json_from(timeout=5)
        await socket.send_json_to(
            {"type": "subscribe", "device": world.charlie_side.lamp.device_id}
        )
        answer = await socket.receive_json_from(timeout=5)
        await socket.disconnect()
        return [snapshot, answer]

    snapshot, answer = async_to_sync(scenario)()
    assert world.alice_side.lamp.device_id in str(snapshot)
    assert not LEAK.search(str(snapshot))
    assert answer.get("type") == "error"
