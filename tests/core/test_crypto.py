"""Secrets at rest: EncryptedTextField, its key handling and its write-only form widget."""

from __future__ import annotations

import base64
import json
import pickle

import pytest
from django import forms
from django.contrib import admin
from django.core import management
from django.core.exceptions import ImproperlyConfigured
from django.db import models, transaction
from django.forms import modelform_factory
from django.test import RequestFactory, override_settings
from django.test.utils import isolate_apps
from unfold.admin import ModelAdmin

from apps.core import crypto
from apps.core.fields import KEEP, DecryptionError, EncryptedTextField, SecretFormField
from apps.devices.models import DeviceCredential
from tests.core.crypto_support import (
    NEW_KEY,
    OLD_KEY,
    make_credential,
    make_key,
    overwrite_stored_value,
    stored_value,
)

PLAINTEXT = "alice-lamp-s3cret"


@pytest.fixture(autouse=True)
def _new_key():
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW_KEY]):
        yield


@pytest.fixture
def alice_credential(alice_lamp) -> DeviceCredential:
    return DeviceCredential.objects.create(
        owner=alice_lamp.owner, device=alice_lamp, username="alice-lamp-1", password=PLAINTEXT
    )


def reload(credential: DeviceCredential) -> DeviceCredential:
    return DeviceCredential.objects.get(pk=credential.pk)


def assert_nothing_secret_in(text: str, credential: DeviceCredential) -> None:
    assert PLAINTEXT not in text
    assert stored_value(credential) not in text
    assert NEW_KEY.split(":", 1)[1] not in text


# --- round trip and storage ---------------------------------------------------------------------
def test_it_round_trips_a_secret_through_the_database(alice_credential):
    assert reload(alice_credential).password.reveal() == PLAINTEXT


def test_the_column_holds_ciphertext_under_the_newest_key_not_plaintext(alice_credential):
    raw = stored_value(alice_credential)
    assert raw.startswith("v1:new:")
    assert PLAINTEXT not in raw
    assert PLAINTEXT.encode() not in base64.urlsafe_b64decode(raw.split(":", 2)[2])


def test_each_save_uses_a_fresh_nonce(alice_credential):
    first = stored_value(alice_credential)
    alice_credential.password = PLAINTEXT
    alice_credential.save()
    assert stored_value(alice_credential) != first
    assert reload(alice_credential).password == PLAINTEXT


def test_saving_an_untouched_row_keeps_its_ciphertext(alice_credential):
    before = stored_value(alice_credential)
    credential = reload(alice_credential)
    credential.username = "renamed"
    credential.save()
    assert stored_value(credential) == before


def test_an_empty_secret_is_stored_empty_without_encryption(alice_lamp):
    credential = DeviceCredential.objects.create(
        owner=alice_lamp.owner, device=alice_lamp, username="empty", password=""
    )
    assert stored_value(credential) == ""
    assert reload(credential).password == ""
    field = DeviceCredential._meta.get_field("password")
    assert field.to_python(None) is None
    assert field.get_prep_value(None) is None


# --- failing closed -----------------------------------------------------------------------------
def test_a_wrong_key_under_the_same_id_fails_closed(alice_credential):
    with override_settings(FIELD_ENCRYPTION_KEYS=[make_key("new")]):
        credential = reload(alice_credential)
        with pytest.raises(DecryptionError, match="authentication failed") as excinfo:
            credential.password  # noqa: B018
    assert "devices.DeviceCredential.password" in str(excinfo.value)
    assert_nothing_secret_in(str(excinfo.value), alice_credential)


def test_an_unknown_key_id_fails_closed(alice_credential):
    with override_settings(FIELD_ENCRYPTION_KEYS=[OLD_KEY]):
        credential = reload(alice_credential)
        with pytest.raises(DecryptionError, match="key id 'new'.*not in FIELD_ENCRYPTION_KEYS"):
            credential.password  # noqa: B018


def flip_last_byte(token: str) -> str:
    prefix, payload = token.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(payload))
    raw[-1] ^= 0x01
    return f"{prefix}:{base64.urlsafe_b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize(
    "tamper",
    [
        flip_last_byte,
        lambda token: token[: len(token) // 2],
        lambda token: token.replace("v1:", "v2:", 1),
        lambda token: "v1:new:!!not-base64!!",
        lambda token: PLAINTEXT,
    ],
    ids=["flipped-bit", "truncated", "unknown-version", "not-base64", "plaintext-in-column"],
)
def test_a_tampered_value_fails_closed(alice_credential, tamper):
    overwrite_stored_value(alice_credential, tamper(stored_value(alice_credential)))
    credential = reload(alice_credential)
    with pytest.raises(DecryptionError) as excinfo:
        credential.password  # noqa: B018
    assert PLAINTEXT not in str(excinfo.value)


def test_a_ciphertext_copied_into_another_owners_row_does_not_decrypt(
    alice_credential, charlie_owner
):
    charlie_credential = make_credential(charlie_owner, "charlie-lamp-9", "charlie-s3cret")
    overwrite_stored_value(charlie_credential, stored_value(alice_credential))
    with pytest.raises(DecryptionError, match="another row or owner"):
        reload(charlie_credential).password  # noqa: B018


def test_a_ciphertext_copied_into_another_row_of_the_same_owner_does_not_decrypt(
    alice_credential, alice_owner
):
    # The uuid in the associated data is what tells two rows of one owner apart.
    other = make_credential(alice_owner, "alice-lamp-2", "other-s3cret")
    overwrite_stored_value(other, stored_value(alice_credential))
    with pytest.raises(DecryptionError):
        reload(other).password  # noqa: B018


def test_moving_an_untouched_secret_to_another_owner_refuses_to_save(
    alice_credential, charlie_owner
):
    credential = reload(alice_credential)
    credential.owner = charlie_owner
    with pytest.raises(DecryptionError, match="set the secret again"), transaction.atomic():
        credential.save()
    credential.password = "fresh-for-charlie"
    credential.save()
    assert reload(credential).password == "fresh-for-charlie"


def test_queryset_writes_cannot_store_plaintext(alice_credential):
    credentials = DeviceCredential.objects.filter(pk=alice_credential.pk)
    with pytest.raises(TypeError, match="is encrypted"), transaction.atomic():
        credentials.update(password="plain")
    credential = reload(alice_credential)
    credential.password = "plain"
    with pytest.raises(TypeError, match="is encrypted"), transaction.atomic():
        DeviceCredential.objects.bulk_update([credential], ["password"])
    assert reload(alice_credential).password == PLAINTEXT


# --- keys ---------------------------------------------------------------------------------------
def test_with_two_keys_old_values_decrypt_and_new_values_use_the_newest(alice_owner):
    with override_settings(FIELD_ENCRYPTION_KEYS=[OLD_KEY]):
        before = make_credential(alice_owner, "alice-lamp-old", "old-s3cret")
    assert stored_value(before).startswith("v1:old:")
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW_KEY, OLD_KEY]):
        after = make_credential(alice_owner, "alice-lamp-new", "new-s3cret")
        assert reload(before).password == "old-s3cret"
        assert reload(after).password == "new-s3cret"
    assert stored_value(after).startswith("v1:new:")
    assert stored_value(before).startswith("v1:old:")  # reading does not rewrite


def test_saving_a_row_moves_its_secret_to_the_newest_key(alice_owner):
    with override_settings(FIELD_ENCRYPTION_KEYS=[OLD_KEY]):
        credential = make_credential(alice_owner, "alice-lamp-old", "old-s3cret")
    with override_settings(FIELD_ENCRYPTION_KEYS=[NEW_KEY, OLD_KEY]):
        reload(credential).save()
    assert stored_value(credential).startswith("v1:new:")
    assert reload(credential).password == "old-s3cret"


KEY_32 = base64.urlsafe_b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "is empty"),
        (f"k1:{KEY_32}", "must be a list"),
        (["no-colon-here"], r"\[0\] is not of the form"),
        ([f"bad id:{KEY_32}"], "key id must be"),
        ([f"k1:{KEY_32}", f"k1:{KEY_32}"], "appears twice"),
        ([f"k1:{KEY_32}", "k2:not*base64"], r"\[1\] \(key id 'k2'\): key is not urlsafe base64"),
        ([f"k1:{base64.urlsafe_b64encode(b'short').decode()}"], "must be 32 bytes, got 5"),
    ],
)
def test_bad_key_settings_fail_loudly_without_echoing_the_key(alice_credential, keys, message):
    with override_settings(FIELD_ENCRYPTION_KEYS=keys):
        with pytest.raises(ImproperlyConfigured, match=message) as excinfo:
            alice_credential.save()
        assert crypto.check_field_encryption_keys()[0].id == "core.E010"
    assert KEY_32 not in str(excinfo.value)
    assert "not*base64" not in str(excinfo.value)


def test_generated_keys_are_valid_and_distinct():
    first, second = crypto.generate_key(), crypto.generate_key()
    ring = crypto.parse_keys([first, second])
    assert ring.primary_id == first.split(":")[0]
    assert first != second


# --- never shown --------------------------------------------------------------------------------
def test_the_secret_never_shows_in_repr_str_or_serialised_forms(alice_credential):
    secret = reload(alice_credential).password
    for text in (repr(secret), str(secret), f"{secret}", repr(reload(alice_credential).__dict__)):
        assert PLAINTEXT not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        json.dumps({"password": secret})


def test_dumpdata_writes_ciphertext_not_plaintext(alice_credential, capsys):
    management.call_command("dumpdata", "devices.DeviceCredential")
    out = capsys.readouterr().out
    assert PLAINTEXT not in out
    assert stored_value(alice_credential) in out


def admin_form_html(credential: DeviceCredential, django_user_model, data=None) -> str:
    request = RequestFactory().get("/")
    request.user = django_user_model.objects.create_superuser("root", "root@example.com", "x")
    form_class = ModelAdmin(DeviceCredential, admin.site).get_form(request, credential)
    form = form_class(data=data, instance=credential)
    if data is not None:
        assert not form.is_valid()
    return str(form)


def test_the_admin_form_renders_no_secret_and_says_it_is_set(alice_credential, django_user_model):
    html = admin_form_html(reload(alice_credential), django_user_model)
    assert_nothing_secret_in(html, alice_credential)
    assert 'type="password"' in html
    assert "set (hidden)" in html
    assert "<textarea" not in html  # the admin's TextField widget must not win


def test_a_rerendered_admin_form_does_not_echo_a_typed_secret(alice_credential, django_user_model):
    data = {"username": "", "password": "typed-n3w-s3cret"}  # username missing: invalid
    html = admin_form_html(reload(alice_credential), django_user_model, data)
    assert "typed-n3w-s3cret" not in html
    assert "set (hidden)" in html


CredentialForm = modelform_factory(DeviceCredential, fields=["username", "password"])


def test_a_blank_secret_in_a_form_keeps_the_stored_one(alice_credential):
    form = CredentialForm(
        data={"username": "alice-lamp-1b", "password": ""}, instance=reload(alice_credential)
    )
    assert form.is_valid(), form.errors
    assert form.changed_data == ["username"]
    form.save()
    assert reload(alice_credential).password == PLAINTEXT


def test_a_typed_secret_in_a_form_replaces_the_stored_one(alice_credential):
    form = CredentialForm(
        data={"username": "alice-lamp-1", "password": " n3w s3cret "},
        instance=reload(alice_credential),
    )
    assert form.is_valid(), form.errors
    form.save()
    assert reload(alice_credential).password == " n3w s3cret "  # whitespace is kept


def test_a_new_row_needs_a_secret(alice_lamp):
    form = CredentialForm(
        data={"username": "new", "password": ""},
        instance=DeviceCredential(owner=alice_lamp.owner, device=alice_lamp),
    )
    assert not form.is_valid()
    assert "password" in form.errors
    assert "not set" in str(form["password"])


class OptionalSecretForm(forms.Form):
    token = SecretFormField(allow_clear=True)


@pytest.mark.parametrize(
    ("data", "expected"),
    [({"token": ""}, KEEP), ({"token": "abc"}, "abc"), ({"token": "", "token__clear": "on"}, "")],
)
def test_an_optional_secret_can_be_kept_replaced_or_cleared(data, expected):
    form = OptionalSecretForm(data=data, initial={"token": "set"})
    assert form.is_valid()
    assert form.cleaned_data["token"] == expected
    assert form.has_changed() is (expected is not KEEP)
    assert "remove the stored secret" in str(OptionalSecretForm(initial={"token": "x"}))


# --- configuration checks -----------------------------------------------------------------------
@isolate_apps("apps.core")
def test_the_system_check_rejects_a_binding_the_model_lacks():
    class Base(models.Model):
        class Meta:
            abstract = True
            app_label = "core"

    class Ownerless(Base):  # noqa: DJ008
        secret = EncryptedTextField()

    class Bound(Base):  # noqa: DJ008
        secret = EncryptedTextField(bind=("missing",))

    class Global(Base):  # noqa: DJ008
        secret = EncryptedTextField(bind=())

    class Indexed(Base):  # noqa: DJ008
        secret = EncryptedTextField(bind=(), unique=True)

    def ids(model):
        return [e.id for e in model._meta.get_field("secret").check()]

    assert ids(Ownerless) == ["core.E011"]
    assert ids(Bound) == ["core.E011"]
    assert ids(Global) == []
    assert ids(Indexed) == ["core.E012"]


def test_the_field_binds_owner_and_uuid_by_default():
    field = DeviceCredential._meta.get_field("password")
    assert field.bound_attnames() == ("owner_id", "uuid")
    assert field.deconstruct()[3] == {}  # default binding: no migration noise
