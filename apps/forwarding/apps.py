from django.apps import AppConfig


class ForwardingConfig(AppConfig):
    name = "apps.forwarding"
    label = "forwarding"
