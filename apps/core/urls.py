from django.urls import path

from . import views

# No trailing slashes: probes and Prometheus ask for these exact paths and do not follow redirects.
urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics_view, name="metrics"),
]
