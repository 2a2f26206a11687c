"""Shared by the live tests (sockets, publisher, browser): real sessions, real channel layer."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime
from typing import Any

from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from apps.devices import events as ev
from apps.devices.models import Device

# Every database the configured channel layer may live in (channels-lite uses "channels").
ALL_DATABASES = list(settings.DATABASES)


def isolated_layer_config() -> dict[str, Any]:
    """The configured channel layer, with a private prefix when it is a shared Redis.

    Group names contain database ids, which repeat across concurrent test runs; a run of its
    own prefix cannot see another run's `owner.1`.
    """
    config = copy.deepcopy(settings.CHANNEL_LAYERS)
    if "redis" in config["default"]["BACKEND"]:
        config["default"].setdefault("CONFIG", {})["prefix"] = f"t{uuid.uuid4().hex[:10]}"
    return config


def shared_cache_config(directory) -> dict[str, Any]:
    """A cache every process can read (files), as production's Redis cache: with it, the
    listener's publisher sends only to groups a socket marked as watched (`live.watch`)."""
    return {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(directory),
        }
    }


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def communicator(cookie: str | None) -> WebsocketCommunicator:
    """A socket through the whole ASGI stack: origin check, session auth, routing."""
    from iotplatform.asgi import application

    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, "/ws/live/", headers=headers)


def event(
    device: Device,
    type_: str = ev.TELEMETRY,
    data: dict[str, Any] | None = None,
    ts: datetime | None = None,
) -> ev.DeviceEvent:
    now = ts or timezone.now()
    return ev.DeviceEvent(
        event_id=f"tel_{uuid.uuid4().hex[:12]}",
        type=type_,
        owner_id=device.owner_id,
        device_pk=device.pk,
        device_id=device.device_id,
        device_name=device.name,
        profile=device.profile,
        ts=now,
        received_at=now,
        data=data or {},
    )
