"""manage.py rotate_field_keys: re-encryption under the newest key, resumable and fail-closed."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from apps.core import crypto
from apps.core.management.commands import rotate_field_keys
from apps.devices.models import DeviceCredential
from tests.core.crypto_support import (
    NEW_KEY,
    OLD_KEY,
    make_credential,
    overwrite_stored_value,
    stored_value,
)

LINE = "devices.DeviceCredential.password"


@pytest.fixture
def credentials(alice_owner, charlie_owner) -> list[DeviceCredential]:
    """Five secrets under the old key (alice 3, charlie 2) and one empty, then two keys live."""
    with override_settings(FIELD_ENCRYPTION_KEYS=[OLD_KEY]):
        made = [
            make_credential(owner, f"rot-{n}", f"rotation-s3cret-{n}")
            for n, owner in enumerate([alice_owner] * 3 + [charlie_owner] * 2)
        ]
        make_credential(alice_owner, "rot-empty", "")
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW_KEY, OLD_KEY]):
        yield made


def rotate(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("rotate_field_keys", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def key_ids(credentials: list[DeviceCredential]) -> list[str]:
    return [crypto.key_id_of(stored_value(c)) for c in credentials]


def plaintexts(credentials: list[DeviceCredential]) -> list[str]:
    return [DeviceCredential.objects.get(pk=c.pk).password.reveal() for c in credentials]


def test_it_reencrypts_every_value_under_the_newest_key(credentials):
    out, err = rotate()
    assert f"{LINE}: re-encrypted 5, already current 0, failed 0" in out
    assert err == ""
    assert key_ids(credentials) == ["new"] * 5
    # The old key is no longer needed for anything.
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW_KEY]):
        assert plaintexts(credentials) == [f"rotation-s3cret-{n}" for n in range(5)]


def test_a_second_run_has_nothing_to_do(credentials):
    rotate()
    after_first = [stored_value(c) for c in credentials]
    out, _ = rotate()
    assert f"{LINE}: re-encrypted 0, already current 5, failed 0" in out
    assert [stored_value(c) for c in credentials] == after_first


def test_a_dry_run_changes_nothing(credentials):
    before = [stored_value(c) for c in credentials]
    out, _ = rotate("--dry-run")
    assert f"{LINE}: would re-encrypt 5, already current 0, failed 0" in out
    assert [stored_value(c) for c in credentials] == before


@pytest.mark.django_db(transaction=True)
def test_an_interrupted_run_resumes_where_it_stopped(credentials, monkeypatch):
    # Real transactions (not the test's savepoints): the crash must roll back only its batch.
    real_encrypt, calls = rotate_field_keys.encrypt, []

    def crash_on_fourth(plaintext: str, aad: bytes) -> crypto.Ciphertext:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("power cut")
        return real_encrypt(plaintext, aad)

    monkeypatch.setattr(rotate_field_keys, "encrypt", crash_on_fourth)
    with pytest.raises(RuntimeError, match="power cut"):
        rotate("--batch-size", "2")
    # Batch one committed; batch two (rows 3 and 4) rolled back as a whole.
    assert key_ids(credentials) == ["new", "new", "old", "old", "old"]

    monkeypatch.setattr(rotate_field_keys, "encrypt", real_encrypt)
    out, _ = rotate("--batch-size", "2")
    assert f"{LINE}: re-encrypted 3, already current 2, failed 0" in out
    assert key_ids(credentials) == ["new"] * 5
    assert plaintexts(credentials) == [f"rotation-s3cret-{n}" for n in range(5)]


def test_it_fails_closed_and_names_the_rows_it_cannot_decrypt(credentials):
    broken = credentials[1]
    # A ciphertext copied from another row: no configured key authenticates it here.
    overwrite_stored_value(broken, stored_value(credentials[0]))
    copied = stored_value(broken)
    with pytest.raises(CommandError, match="1 value.*could not be decrypted"):
        rotate()
    assert stored_value(broken) == copied  # never overwritten
    assert key_ids(credentials) == ["new", "old", "new", "new", "new"]


def test_the_report_names_the_row_but_no_secret(credentials, capsys, caplog):
    overwrite_stored_value(credentials[2], stored_value(credentials[0]))
    err = io.StringIO()
    with pytest.raises(CommandError):
        call_command("rotate_field_keys", stdout=io.StringIO(), stderr=err)
    report = err.getvalue()
    assert f"devices.DeviceCredential pk={credentials[2].pk}" in report
    everything = report + caplog.text + "".join(capsys.readouterr())
    assert "rotation-s3cret" not in everything
    assert OLD_KEY.split(":")[1] not in everything and NEW_KEY.split(":")[1] not in everything


def test_an_unknown_key_id_fails_the_run(credentials):
    with (
        override_settings(FIELD_ENCRYPTION_KEYS=[NEW_KEY]),
        pytest.raises(CommandError, match="5 value"),
    ):
        rotate()
    assert key_ids(credentials) == ["old"] * 5


def test_a_value_the_application_changed_meanwhile_is_left_alone(credentials, monkeypatch):
    real_decrypt = rotate_field_keys.decrypt
    target = credentials[0]

    def decrypt_while_someone_saves(token: str, aad: bytes) -> str:
        plaintext = real_decrypt(token, aad)
        if token == original:
            credential = DeviceCredential.objects.get(pk=target.pk)
            credential.password = "changed-by-the-app"
            credential.save()
        return plaintext

    original = stored_value(target)
    monkeypatch.setattr(rotate_field_keys, "decrypt", decrypt_while_someone_saves)
    out, _ = rotate()
    assert "re-encrypted 4" in out and "changed by the application meanwhile 1" in out
    assert plaintexts([target]) == ["changed-by-the-app"]


def test_a_bad_batch_size_is_refused(credentials):
    with pytest.raises(CommandError, match="batch-size"):
        rotate("--batch-size", "0")
