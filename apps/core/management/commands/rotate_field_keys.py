"""Re-encrypt every EncryptedTextField value under the newest FIELD_ENCRYPTION_KEYS key.

Safe to interrupt and rerun: each batch commits on its own, and values already under the newest
key are skipped by the query, so a rerun continues where the last one stopped. Each row is
written with a conditional UPDATE (old ciphertext in the WHERE), so a value the application
changed in the meantime is left alone. Values that no configured key decrypts are listed by row
and make the command exit non-zero; they are never overwritten. See docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, router, transaction

from apps.core.crypto import Ciphertext, DecryptionError, current_key_id, decrypt, encrypt
from apps.core.fields import EncryptedTextField


@dataclass
class Tally:
    rotated: int = 0
    current: int = 0
    changed_meanwhile: int = 0
    failed: list[tuple[Any, str]] = field(default_factory=list)


def encrypted_fields() -> list[tuple[type[models.Model], EncryptedTextField]]:
    found = []
    for model in apps.get_models():
        if model._meta.proxy or not model._meta.managed:
            continue
        for f in model._meta.local_concrete_fields:
            if isinstance(f, EncryptedTextField):
                found.append((model, f))
    return found


class Command(BaseCommand):
    help = "Re-encrypt stored secrets under the newest key of FIELD_ENCRYPTION_KEYS."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Decrypt and count, write nothing.",
        )
        parser.add_argument("--batch-size", type=int, default=200, help="Rows per transaction.")

    def handle(self, *args: Any, dry_run: bool = False, batch_size: int = 200, **opts: Any) -> None:
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        newest = current_key_id()  # also validates the keys before touching anything
        self.stdout.write(
            f"Newest key: {newest}{' (dry run: nothing is written)' if dry_run else ''}"
        )
        failures = 0
        for model, f in encrypted_fields():
            tally = self.rotate(model, f, newest, dry_run, batch_size)
            verb = "would re-encrypt" if dry_run else "re-encrypted"
            line = (
                f"{model._meta.label}.{f.name}: {verb} {tally.rotated}, "
                f"already current {tally.current}, failed {len(tally.failed)}"
            )
            if tally.changed_meanwhile:
                line += f", changed by the application meanwhile {tally.changed_meanwhile}"
            self.stdout.write(line)
            for pk, reason in tally.failed:
                self.stderr.write(f"  {model._meta.label} pk={pk}: {reason}")
            failures += len(tally.failed)
        if failures:
            raise CommandError(
                f"{failures} value(s) could not be decrypted with any configured key; they were "
                "left untouched. Do not remove old keys until this is resolved."
            )

    def rotate(
        self,
        model: type[models.Model],
        f: EncryptedTextField,
        newest: str,
        dry_run: bool,
        batch_size: int,
    ) -> Tally:
        db = router.db_for_write(model)
        base = (
            model._base_manager.using(db)
            .exclude(**{f"{f.attname}__isnull": True})
            .exclude(**{f.attname: Ciphertext("")})
        )
        # Prefix match on "v1:<newest>:" selects what still needs work; that is what makes a
        # rerun resume instead of starting over.
        newest_prefix = {f"{f.attname}__startswith": f"v1:{newest}:"}
        tally = Tally(current=base.filter(**newest_prefix).count())
        pending = base.exclude(**newest_prefix).order_by("pk")
        bound = f.bound_attnames()
        last_pk = None
        while True:
            page = pending if last_pk is None else pending.filter(pk__gt=last_pk)
            rows = list(page.values("pk", f.attname, *bound)[:batch_size])
            if not rows:
                return tally
            last_pk = rows[-1]["pk"]
            with transaction.atomic(using=db):
                for row in rows:
                    self.rotate_row(model, f, db, row, dry_run, tally)

    def rotate_row(
        self,
        model: type[models.Model],
        f: EncryptedTextField,
        db: str,
        row: dict[str, Any],
        dry_run: bool,
        tally: Tally,
    ) -> None:
        old = row[f.attname]
        aad = f.associated_data(row)
        try:
            plaintext = decrypt(old, aad)
        except DecryptionError as exc:
            tally.failed.append((row["pk"], str(exc)))
            return
        if dry_run:
            tally.rotated += 1
            return
        written = (
            model._base_manager.using(db)
            .filter(pk=row["pk"], **{f.attname: old})
            .update(**{f.attname: encrypt(plaintext, aad)})
        )
        if written:
            tally.rotated += 1
        else:
            tally.changed_meanwhile += 1
