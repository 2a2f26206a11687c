"""Create (or bring back) the demo owner that `make run` shows: safe to run any number of times.

The devices match what `simulate_devices --owner demo` plays: three ESP32 lamps, a 1-relay Tasmota
plug (default topic order), a 4-relay Tasmota board using the topic-first FullTopic, and a DC and
an AC traction meter. Re-running restores their configuration but never touches their state
(connection, power, readings), and resets the demo password so the login printed by `make run`
is always true.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from apps.devices.models import Device, Profile, TasmotaTopicOrder
from apps.owners.models import Membership, Owner, Role

DEMO_SLUG = "demo"
DEMO_USERNAME = "demo"
ADMIN_USERNAME = "admin"


@dataclass(frozen=True)
class DemoDevice:
    device_id: str
    name: str
    location: str
    profile: str
    expected_interval: int
    topic: str = ""
    relay_count: int = 1
    topic_order: str = TasmotaTopicOrder.PREFIX_FIRST
    # Only a starting value: the listener overwrites it from the meter's `hello`.
    device_type: str = ""


# Intervals match the simulator's defaults in the demo: lamps and meters every 10 s, Tasmota
# TelePeriod 30 s, so the offline timeout (3 x interval) notices a stopped simulator quickly.
DEMO_DEVICES: tuple[DemoDevice, ...] = (
    DemoDevice("demo-lamp-1", "Living room lamp", "Living room", Profile.ESP32_LAMP, 10),
    DemoDevice("demo-lamp-2", "Kitchen lamp", "Kitchen", Profile.ESP32_LAMP, 10),
    DemoDevice("demo-lamp-3", "Porch lamp", "Porch", Profile.ESP32_LAMP, 10),
    DemoDevice(
        "demo-plug-1",
        "Coffee machine plug",
        "Kitchen",
        Profile.TASMOTA,
        30,
        topic="tasmota_plug1",
    ),
    DemoDevice(
        "demo-relay4",
        "Garden relay board",
        "Garden",
        Profile.TASMOTA,
        30,
        topic="tasmota_relay4",
        relay_count=4,
        topic_order=TasmotaTopicOrder.TOPIC_FIRST,
    ),
    DemoDevice(
        "demo-meter-dc",
        "Traction meter DC",
        "Substation",
        Profile.METER_V2,
        10,
        device_type="power_meter_dc",
    ),
    DemoDevice(
        "demo-meter-ac",
        "Traction meter AC",
        "Substation",
        Profile.METER_V2,
        10,
        device_type="power_meter_ac",
    ),
)


def seed_device(owner: Owner, spec: DemoDevice) -> tuple[Device, bool]:
    existing = Device.objects.filter(device_id=spec.device_id).first()
    if existing is not None and existing.owner_id != owner.pk:
        # Device ids are global: never move someone else's device into the demo.
        raise CommandError(
            f"Device id {spec.device_id!r} already belongs to owner {existing.owner}; "
            "the demo cannot be seeded on this database."
        )
    config = {
        "owner": owner,
        "name": spec.name,
        "location": spec.location,
        "profile": spec.profile,
        "topic": spec.topic or spec.device_id,
        "relay_count": spec.relay_count,
        "topic_order": spec.topic_order,
        "expected_interval": spec.expected_interval,
    }
    return Device.objects.update_or_create(
        device_id=spec.device_id,
        defaults=config,
        create_defaults={**config, "device_type": spec.device_type},
    )


class Command(BaseCommand):
    help = "Create or refresh the demo owner, its login and devices of every profile (idempotent)."

    @transaction.atomic
    def handle(self, *args, **options) -> None:
        user_model = get_user_model()
        owner, _ = Owner.objects.update_or_create(
            slug=DEMO_SLUG, defaults={"name": "Demo Home", "timezone": "Asia/Jakarta"}
        )

        demo, _ = user_model.objects.get_or_create(
            username=DEMO_USERNAME, defaults={"email": "demo@example.com"}
        )
        # Staff so the admin (the main UI) lets them in; not a superuser, so the owner scoping
        # applies to them like to any tenant user.
        demo.is_staff, demo.is_superuser, demo.is_active = True, False, True
        demo.set_password(settings.DEMO_PASSWORD)
        demo.save()
        Membership.objects.update_or_create(owner=owner, user=demo, defaults={"role": Role.OWNER})

        if settings.DEMO_ADMIN_PASSWORD:
            admin, _ = user_model.objects.get_or_create(
                username=ADMIN_USERNAME, defaults={"email": "admin@example.com"}
            )
            admin.is_staff, admin.is_superuser, admin.is_active = True, True, True
            admin.set_password(settings.DEMO_ADMIN_PASSWORD)
            admin.save()

        created = [spec.device_id for spec in DEMO_DEVICES if seed_device(owner, spec)[1]]
        self.stdout.write(
            f"Demo owner {owner.name!r} (slug {owner.slug}): {len(DEMO_DEVICES)} devices, "
            f"{len(created)} new; login {DEMO_USERNAME!r}"
            + (f", superuser {ADMIN_USERNAME!r}" if settings.DEMO_ADMIN_PASSWORD else "")
        )
