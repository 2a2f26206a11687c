"""`manage.py provision_broker`: devices' MQTT logins in Mosquitto (docs/operations.md).

    provision_broker --device ID [--device ID …]   issue a login if missing, sync it to the broker
    provision_broker --all                         every device (revoked ones stay revoked), then
                                                   remove orphaned broker logins
    provision_broker --rotate ID                   new password; the device is disconnected
    provision_broker --revoke ID                   delete the login; the device is disconnected
    --dry-run                                      show what would change, change nothing
    --secret-file PATH                             (one --device/--rotate) write the login, mode 600

Idempotent: running it again changes nothing and disconnects nobody. It prints what it did, never
a password; the only way a password leaves is the file asked for with --secret-file.
"""

from __future__ import annotations

import json
import os
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.devices import credentials
from apps.devices.broker import BrokerError, BrokerNotConfigured, DynsecAdmin
from apps.devices.credentials import CredentialRefused, Outcome
from apps.devices.models import Device, DeviceCredential

ACTIONS = {
    "device": ("issue", credentials.issue_credential),
    "rotate": ("rotate", credentials.rotate_credential),
    "revoke": ("revoke", credentials.revoke_credential),
    "sync": ("sync", credentials.sync_credential),
}


class Command(BaseCommand):
    help = "Provision, rotate or revoke devices' MQTT logins in Mosquitto (dynamic security)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument("--device", action="append", metavar="ID", help="issue and sync")
        mode.add_argument("--all", action="store_true", help="every device; prune orphans")
        mode.add_argument("--rotate", action="append", metavar="ID", help="new password")
        mode.add_argument("--revoke", action="append", metavar="ID", help="delete the login")
        parser.add_argument("--dry-run", action="store_true", help="change nothing")
        parser.add_argument(
            "--secret-file",
            metavar="PATH",
            help="with one --device or --rotate: write its login as JSON to this new file (600)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ids: list[str] | None = None  # None: every device
        mode = "all"
        if not options["all"]:
            mode = next(m for m in ("device", "rotate", "revoke") if options[m])
            ids = options[mode]
        secret_file = options["secret_file"]
        if secret_file and (mode == "revoke" or ids is None or len(ids) != 1):
            raise CommandError("--secret-file goes with exactly one --device or --rotate")
        if secret_file and os.path.exists(secret_file):
            raise CommandError(f"{secret_file} exists; the secret file must be new")
        devices = self._devices(ids)
        try:
            admin = DynsecAdmin.from_settings()
            admin.open()
        except BrokerNotConfigured as exc:
            raise CommandError(str(exc)) from None
        except BrokerError as exc:
            raise CommandError(f"{exc}; nothing changed") from None

        failures = 0
        try:
            for device in devices:
                if mode == "all":
                    # An explicit --device may re-issue a revoked login; a sweep never does.
                    has_one = DeviceCredential.objects.filter(device=device).exists()
                    mode_here = "sync" if has_one else "device"
                else:
                    mode_here = mode
                if options["dry_run"]:
                    failures += self._dry_run(admin, device, ACTIONS[mode_here][0])
                else:
                    failures += self._run(admin, device, mode_here)
            if options["all"]:
                failures += self._prune(admin, options["dry_run"])
        finally:
            admin.close()
        if failures:
            raise CommandError(
                f"{failures} problem(s), see above. The database is the source of truth: rerun "
                "once the cause is fixed (nothing already in line is changed again)."
            )
        if secret_file and not options["dry_run"]:
            self._write_secret(devices[0], secret_file)

    def _devices(self, ids: list[str] | None) -> list[Device]:
        qs = Device.objects.select_related("owner").order_by("device_id")
        if ids is None:
            return list(qs)
        found = {d.device_id: d for d in qs.filter(device_id__in=ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise CommandError(f"no device with id {', '.join(missing)}; nothing changed")
        return [found[i] for i in dict.fromkeys(ids)]

    def _run(self, admin: DynsecAdmin, device: Device, mode: str) -> int:
        try:
            outcome: Outcome = ACTIONS[mode][1](device, admin=admin)
        except CredentialRefused as exc:
            self.stderr.write(f"{device.device_id}: refused: {exc}")
            return 1
        if outcome.failed:
            self.stderr.write(str(outcome))
            return 1
        self.stdout.write(str(outcome))
        return 0

    def _dry_run(self, admin: DynsecAdmin, device: Device, action: str) -> int:
        try:
            change, steps = credentials.plan_credential(device, admin, action)
        except (CredentialRefused, BrokerError) as exc:
            self.stderr.write(f"{device.device_id}: refused: {exc}")
            return 1
        would = ", ".join(s.text for s in steps) or "already up to date"
        self.stdout.write(f"{device.device_id}: {change}; broker, not done (dry run): {would}")
        return 0

    def _prune(self, admin: DynsecAdmin, dry_run: bool) -> int:
        try:
            done = credentials.prune(admin, dry_run=dry_run)
        except BrokerError as exc:
            self.stderr.write(f"removing orphaned broker logins failed: {exc}")
            return 1
        prefix = "broker, not done (dry run)" if dry_run else "broker"
        for text in done:
            self.stdout.write(f"{prefix}: {text}")
        return 0

    def _write_secret(self, device: Device, path: str) -> None:
        credential = DeviceCredential.objects.get(device=device)
        body = json.dumps(
            {
                "device_id": device.device_id,
                "username": credential.username,
                "password": credential.password.reveal(),
            },
            indent=2,
        )
        # O_EXCL: never through a link or over an existing file; 0600 from the first byte.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
        self.stdout.write(f"{device.device_id}: login written to {path} (mode 600)")
