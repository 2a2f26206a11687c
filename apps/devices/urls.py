from django.urls import path

from . import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("devices/<str:device_id>/", views.device_detail, name="device-detail"),
    path("devices/<str:device_id>/command/", views.device_command, name="device-command"),
]
