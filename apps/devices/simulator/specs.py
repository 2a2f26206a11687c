"""Which devices to simulate: an owner's devices from the database, or made-up ones."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from apps.devices.models import DEVICE_ID_RE, Device, Profile, TasmotaTopicOrder

from .base import DeviceSpec
from .meter_v2 import AC, DC

PROFILES = [p.value for p in Profile]
SHORT_NAMES = {Profile.ESP32_LAMP: "lamp", Profile.TASMOTA: "tasmota", Profile.METER_V2: "meter"}
METER_TYPES = {"dc": (DC, 3), "ac": (AC, 3), "ac1": (AC, 1)}


def owner_specs(
    owner_slug: str,
    *,
    device_ids: Sequence[str] = (),
    profile: str | None = None,
    interval: float | None = None,
) -> list[DeviceSpec]:
    """The devices of one owner, each as the database describes it.

    A device with a live broker credential logs in with it (as the real device would), so a
    Mosquitto with per-device ACLs accepts exactly what the platform provisioned.
    """
    qs = Device.objects.filter(owner__slug=owner_slug).select_related("credential")
    if device_ids:
        qs = qs.filter(device_id__in=device_ids)
    if profile:
        qs = qs.filter(profile=profile)
    specs = []
    for device in qs.order_by("device_id"):
        credential = getattr(device, "credential", None)
        if credential is not None and credential.revoked_at is not None:
            credential = None
        specs.append(
            DeviceSpec(
                device_id=device.device_id,
                profile=device.profile,
                topic=device.topic or device.device_id,
                topic_order=device.topic_order,
                relay_count=device.relay_count,
                interval=float(interval or device.expected_interval),
                device_type=device.device_type
                if device.device_type in (DC, AC)
                else _meter_type(device),
                power={str(k): str(v) for k, v in (device.power or {}).items()},
                username=credential.username if credential else "",
                # Decrypting fails loudly on a wrong key: better than connecting without a login.
                password=credential.password.reveal() if credential and credential.password else "",
            )
        )
    return specs


def _meter_type(device: Device) -> str:
    """A meter that has not reported yet: the same guess on every run (not a coin flip)."""
    if device.profile != Profile.METER_V2:
        return ""
    hint = f"{device.name} {device.device_id}".lower()
    if re.search(r"\bdc\b|traction", hint):
        return DC
    if re.search(r"\bac\b", hint):
        return AC
    return DC if zlib.crc32(device.device_id.encode()) % 2 == 0 else AC


def synthetic_specs(
    count: int,
    profile: str,
    *,
    prefix: str = "sim",
    interval: float = 10.0,
    relays: int = 1,
    topic_order: str = TasmotaTopicOrder.PREFIX_FIRST,
    meter_type: str = "mixed",
) -> list[DeviceSpec]:
    """`count` devices named `{prefix}-{lamp|tasmota|meter}-{n:05d}`; profile "mixed" cycles
    through all three."""
    if count < 1:
        raise ValueError("count must be at least 1")
    if profile != "mixed" and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)} or mixed")
    if not 1 <= relays <= 8:
        raise ValueError("relays must be 1..8")
    probe = f"{prefix}-tasmota-{count:05d}"
    if not re.fullmatch(DEVICE_ID_RE, probe):
        raise ValueError(f"prefix {prefix!r} does not make valid device ids (e.g. {probe!r})")
    if meter_type != "mixed" and meter_type not in METER_TYPES:
        raise ValueError(f"unknown meter type {meter_type!r}; use dc, ac, ac1 or mixed")
    specs = []
    meters = 0
    for i in range(count):
        p = PROFILES[i % len(PROFILES)] if profile == "mixed" else profile
        device_id = f"{prefix}-{SHORT_NAMES[Profile(p)]}-{i + 1:05d}"
        kind = meter_type if meter_type != "mixed" else ("dc", "ac", "ac1")[meters % 3]
        meters += p == Profile.METER_V2
        device_type, phases = METER_TYPES[kind] if p == Profile.METER_V2 else ("", 3)
        specs.append(
            DeviceSpec(
                device_id=device_id,
                profile=p,
                topic=device_id,
                topic_order=topic_order,
                relay_count=relays if p == Profile.TASMOTA else 1,
                interval=interval,
                device_type=device_type,
                phases=phases,
            )
        )
    return specs
