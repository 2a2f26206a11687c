"""Routes of /api/v1/. Every route needs an API key except the allow-list below (schema, docs).

The isolation test (`tests/test_isolation.py`) enumerates these patterns: a route added here
without owner scoping, or a public route not in PUBLIC_ROUTES, fails it.
"""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from apps.forwarding import kinds

from .errors import not_found
from .resources.capabilities import CapabilitiesView
from .resources.commands import CommandViewSet, DeviceCommandView
from .resources.delivery import DeliveryViewSet, DestinationViewSet, kind_viewset
from .resources.devices import DEVICE_LOOKUP, DeviceViewSet
from .resources.schedules import GroupViewSet, ScheduleViewSet

app_name = "api"

# Public on purpose: the description of the API, and its docs pages (static assets only).
PUBLIC_ROUTES = frozenset({"api:schema", "api:docs", "api:redoc", "api:not-found"})

router = SimpleRouter()
router.register("devices", DeviceViewSet, basename="device")
router.register("commands", CommandViewSet, basename="command")
router.register("schedules", ScheduleViewSet, basename="schedule")
router.register("groups", GroupViewSet, basename="group")
# Kinds first: "destinations/webhook/" must not be read as a destination id.
for key in kinds.KINDS:
    router.register(f"destinations/{key}", kind_viewset(key), basename=f"destination-{key}")
router.register("destinations", DestinationViewSet, basename="destination")
router.register("deliveries", DeliveryViewSet, basename="delivery")

urlpatterns: list[URLPattern | URLResolver] = [
    re_path(
        rf"^devices/(?P<device_id>{DEVICE_LOOKUP})/commands/$",
        DeviceCommandView.as_view({"post": "create"}),
        name="device-commands",
    ),
    path("capabilities/", CapabilitiesView.as_view(), name="capabilities"),
    path("", include(router.urls)),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api:schema"), name="redoc"),
    re_path(r"^.*$", not_found, name="not-found"),  # JSON 404 for unknown API paths
]
