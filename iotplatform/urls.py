from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("apps.api.urls")),  # integration API (docs/api.md)
    path("", include("apps.core.urls")),  # /healthz, /readyz, /metrics
    path("", include("apps.devices.urls")),
]
