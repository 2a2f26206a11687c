"""API keys from the command line (the admin's "API keys" tab does the same).

    manage.py api_key create --owner demo --name "billing sync" --scopes devices:read,commands:write
    manage.py api_key list --owner demo
    manage.py api_key revoke --owner demo --prefix iotp_Ab12Cd34

`create` prints the token once, on stdout alone (so `KEY=$(manage.py api_key create …)` works).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.api.actions import InvalidScopes, create_api_key, revoke_api_key
from apps.api.models import ALL_SCOPES, ApiKey
from apps.owners.models import Owner


class Command(BaseCommand):
    help = "Create, list or revoke the API keys of an IoT owner."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create a key and print its token once.")
        create.add_argument("--owner", required=True, help="The owner's slug.")
        create.add_argument("--name", required=True)
        create.add_argument(
            "--scopes",
            default="",
            help=f"Comma-separated, from: {', '.join(ALL_SCOPES)}; 'all' for every scope.",
        )
        listing = sub.add_parser("list", help="The owner's keys (never their tokens).")
        listing.add_argument("--owner", required=True)
        revoke = sub.add_parser("revoke", help="Revoke a key at once.")
        revoke.add_argument("--owner", required=True)
        revoke.add_argument("--prefix", required=True, help="The key's prefix, iotp_XXXXXXXX.")

    def handle(self, *args: Any, action: str, owner: str, **options: Any) -> None:
        found = Owner.objects.filter(slug=owner).first()
        if found is None:
            raise CommandError(f"no owner with slug {owner!r}")
        getattr(self, f"_{action}")(found, **options)

    def _create(self, owner: Owner, *, name: str, scopes: str, **_: Any) -> None:
        chosen = ALL_SCOPES if scopes == "all" else [s for s in scopes.split(",") if s.strip()]
        try:
            key, token = create_api_key(owner, name, [s.strip() for s in chosen])
        except InvalidScopes as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"API key {key.name!r} of {owner.slug}: {', '.join(key.scopes)}")
        self.stdout.write(token)

    def _list(self, owner: Owner, **_: Any) -> None:
        for key in ApiKey.objects.filter(owner=owner):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            self.stdout.write(f"{key.prefix}  {key.name}  [{', '.join(key.scopes)}]  {state}")

    def _revoke(self, owner: Owner, *, prefix: str, **_: Any) -> None:
        keys = list(ApiKey.objects.filter(owner=owner, prefix=prefix.rstrip("…")))
        if len(keys) != 1:
            raise CommandError(f"{len(keys)} keys of {owner.slug} have the prefix {prefix!r}")
        revoke_api_key(keys[0])
        self.stdout.write(f"revoked {keys[0].prefix} ({keys[0].name})")
