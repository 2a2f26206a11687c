"""Encrypted model fields and write-only form widgets for secrets at rest.

    password = EncryptedTextField()                       # binds owner_id (+ uuid if present)
    secret = EncryptedTextField(bind=("owner_id", "uuid"), blank=True)
    cred.password = "hunter2"; cred.save()                # encrypted in pre_save
    cred.password.reveal()                                # decrypted on attribute access

What an instance holds for the field, in `instance.__dict__`:
- `None` / `""`: no secret (stored as is, never encrypted);
- `Ciphertext`: loaded from the database, not yet decrypted;
- `Secret`: plaintext set by code or decrypted on access; masks itself in str/repr.

Associated data binds each ciphertext to model label + field name + the `bind` attributes, so a
value copied into another owner's (or, with a uuid, another) row fails to decrypt. A row whose
bound attributes change keeps working only if the secret is re-set or decrypted before saving.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from django import forms
from django.core import checks
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import models
from django.db.models.query_utils import DeferredAttribute
from django.utils.html import format_html

from apps.core.crypto import (
    Ciphertext,
    DecryptionError,
    Secret,
    current_key_id,
    decrypt,
    encrypt,
    key_id_of,
)

__all__ = [
    "KEEP",
    "DecryptionError",
    "EncryptedTextField",
    "Secret",
    "SecretFormField",
    "SecretInput",
]

AAD_DOMAIN = "iotplatform.field.v1"


class _Keep:
    """Form value meaning "left blank: keep the stored secret"."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
_CLEAR = object()


class SecretDescriptor(DeferredAttribute):
    """Decrypts on first attribute access (from_db_value has no instance, hence no binding).

    A data descriptor (it defines __set__), so every read goes through __get__ even when the
    value is already in the instance dict.
    """

    field: EncryptedTextField

    def __get__(self, instance: models.Model | None, cls: type | None = None) -> Any:
        if instance is None:
            return self
        value = super().__get__(instance, cls)
        if isinstance(value, Ciphertext):
            value = Secret(self.field.decrypt_for(instance, value))
            instance.__dict__[self.field.attname] = value
        return value

    def __set__(self, instance: models.Model, value: object) -> None:
        instance.__dict__[self.field.attname] = self.field.wrap(value)


class EncryptedTextField(models.TextField):
    """A text secret stored as AES-GCM ciphertext bound to its row.

    bind: attribute names (attnames) whose values go into the associated data. Default: the
    row's `owner_id`, plus `uuid` when the model has one. `bind=()` for a global secret.
    Lookups other than isnull and "" make no sense on randomised ciphertext.
    """

    descriptor_class = SecretDescriptor
    description = "Encrypted text"

    def __init__(self, *args: Any, bind: tuple[str, ...] | None = None, **kwargs: Any) -> None:
        self.bind = tuple(bind) if bind is not None else None
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[str, str, list[Any], dict[str, Any]]:
        name, path, args, kwargs = super().deconstruct()
        if self.bind is not None:
            kwargs["bind"] = self.bind
        return name, path, args, kwargs

    # --- binding ------------------------------------------------------------------------------
    def bound_attnames(self) -> tuple[str, ...]:
        if self.bind is not None:
            return self.bind
        names = ["owner_id"]
        try:
            self.model._meta.get_field("uuid")
            names.append("uuid")
        except FieldDoesNotExist:
            pass
        return tuple(names)

    def associated_data(self, values: Mapping[str, Any]) -> bytes:
        """The associated data for a row whose bound attributes have these values."""
        bound = []
        for attname in self.bound_attnames():
            try:
                target = self.model._meta.get_field(attname)
            except FieldDoesNotExist:
                raise ImproperlyConfigured(
                    f"{self.model._meta.label}.{self.name}: bind names {attname!r}, "
                    "which is not a field of the model"
                ) from None
            # Normalise through the field so "a1b2..." and UUID("a1b2...") bind the same.
            value = target.to_python(values[attname])
            bound.append([attname, None if value is None else str(value)])
        parts = [AAD_DOMAIN, self.model._meta.label_lower, self.name, bound]
        return json.dumps(parts, separators=(",", ":")).encode()

    def _instance_aad(self, instance: models.Model) -> bytes:
        return self.associated_data({a: getattr(instance, a) for a in self.bound_attnames()})

    def _context(self, instance: models.Model) -> str:
        return f"{self.model._meta.label}.{self.name} of row pk={instance.pk}"

    def decrypt_for(self, instance: models.Model, token: Ciphertext) -> str:
        try:
            return decrypt(token, self._instance_aad(instance))
        except DecryptionError as exc:
            raise DecryptionError(f"{self._context(instance)}: {exc}") from None

    # --- values -------------------------------------------------------------------------------
    def wrap(self, value: object) -> None | str | Ciphertext | Secret:
        """The in-memory form of an assigned value (see module docstring)."""
        if value is None or isinstance(value, Ciphertext | Secret):
            return value
        if isinstance(value, str):
            return Secret(value) if value else ""
        raise TypeError(f"{self.model._meta.label}.{self.name} takes text, not a {type(value)}")

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Any:
        return Ciphertext(value) if value else value

    def to_python(self, value: Any) -> Any:
        return self.wrap(value)

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        value = model_instance.__dict__.get(self.attname)
        if not value:
            return value
        aad = self._instance_aad(model_instance)
        if isinstance(value, Ciphertext):
            # Untouched since loading: check it still belongs to this row (its owner/uuid may
            # have changed) and move it to the newest key while we are here.
            try:
                plaintext = decrypt(value, aad)
            except DecryptionError as exc:
                raise DecryptionError(
                    f"{self._context(model_instance)}: {exc}; set the secret again to save"
                ) from None
            if key_id_of(value) == current_key_id():
                return value
            token = encrypt(plaintext, aad)
            model_instance.__dict__[self.attname] = token
            return token
        return encrypt(value.reveal(), aad)

    def get_prep_value(self, value: Any) -> Any:
        # Only ciphertext reaches the database: anything else came around pre_save (update(),
        # bulk_update(), a filter on a plaintext) and would store or compare plaintext.
        if value is None or value == "" or isinstance(value, Ciphertext):
            return None if value is None else str(value)
        raise TypeError(
            f"{self.model._meta.label}.{self.name} is encrypted: set it on an instance and "
            "save() it (QuerySet.update, bulk_update and lookups cannot encrypt)"
        )

    def value_from_object(self, obj: models.Model) -> Any:
        # Forms only need to know whether a secret is set: no decryption to render a page.
        return obj.__dict__.get(self.attname)

    def value_to_string(self, obj: models.Model) -> str:
        # dumpdata writes ciphertext, never plaintext.
        return self.pre_save(obj, add=False) or ""

    def save_form_data(self, instance: models.Model, data: Any) -> None:
        if data is not KEEP:
            setattr(instance, self.name, data)

    def formfield(self, **kwargs: Any) -> forms.Field:
        # The admin passes a Textarea for every TextField; a secret must never get one.
        widget = kwargs.get("widget")
        widget_class = widget if isinstance(widget, type) else type(widget)
        if not issubclass(widget_class, SecretInput):
            kwargs["widget"] = SecretInput
        form_class = kwargs.get("form_class")
        if not (isinstance(form_class, type) and issubclass(form_class, SecretFormField)):
            kwargs["form_class"] = SecretFormField
        kwargs.setdefault("allow_clear", self.blank)
        kwargs.pop("max_length", None)
        return models.Field.formfield(self, **kwargs)

    # --- checks -------------------------------------------------------------------------------
    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        errors = [*super().check(**kwargs)]
        if self.model._meta.abstract:
            return errors
        for attname in self.bound_attnames():
            try:
                self.model._meta.get_field(attname)
            except FieldDoesNotExist:
                hint = (
                    "Pass bind=(...) naming the fields that identify the row, or bind=() "
                    "for a secret that belongs to no owner."
                    if self.bind is None
                    else None
                )
                errors.append(
                    checks.Error(
                        f"EncryptedTextField binds to {attname!r}, which is not a field of "
                        f"{self.model._meta.label}.",
                        hint=hint,
                        obj=self,
                        id="core.E011",
                    )
                )
        if self.unique or self.db_index or self.primary_key:
            errors.append(
                checks.Error(
                    "An EncryptedTextField cannot be unique, indexed or a primary key: each "
                    "encryption is randomised.",
                    obj=self,
                    id="core.E012",
                )
            )
        return errors


# --- forms ------------------------------------------------------------------------------------
def _admin_input_classes() -> str:
    try:  # the admin theme's input styling, when it is installed
        from unfold.widgets import INPUT_CLASSES
    except ImportError:  # pragma: no cover - unfold is a requirement today
        return ""
    return " ".join(INPUT_CLASSES)


class SecretInput(forms.PasswordInput):
    """Write-only input: renders empty, says whether a secret is set, keeps it when left blank.

    With `allow_clear`, a checkbox lets the user remove an optional secret.
    """

    def __init__(self, attrs: dict[str, Any] | None = None, allow_clear: bool = False) -> None:
        attrs = {"class": _admin_input_classes(), **(attrs or {})}
        # Stops browsers from filling the user's own login password into the field.
        attrs.setdefault("autocomplete", "new-password")
        super().__init__(attrs, render_value=False)
        self.allow_clear = allow_clear

    def clear_name(self, name: str) -> str:
        return f"{name}__clear"

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        is_set = bool(value)  # a Ciphertext, Secret or text; truthiness never decrypts
        attrs = {**(attrs or {})}
        attrs["placeholder"] = "set (hidden) — leave blank to keep" if is_set else "not set"
        context = super().get_context(name, None, attrs)
        context["widget"]["is_set"] = is_set
        return context

    def render(self, name: str, value: Any, attrs: Any = None, renderer: Any = None) -> str:
        html = super().render(name, value, attrs, renderer)
        if self.allow_clear and value:
            html += format_html(
                ' <label><input type="checkbox" name="{}"> remove the stored secret</label>',
                self.clear_name(name),
            )
        return html

    def value_from_datadict(self, data: Any, files: Any, name: str) -> Any:
        if self.allow_clear and data.get(self.clear_name(name)):
            return _CLEAR
        return data.get(name)

    def value_omitted_from_data(self, data: Any, files: Any, name: str) -> bool:
        return name not in data and self.clear_name(name) not in data


class SecretFormField(forms.CharField):
    """Cleans to the typed text, to KEEP when left blank, or to "" when cleared.

    Required-ness is the model's business (blank=False): "blank" here means "unchanged", and
    the model's full_clean rejects a new row without a secret. Plain forms check `is KEEP`.
    """

    widget = SecretInput

    def __init__(self, *, allow_clear: bool = False, **kwargs: Any) -> None:
        kwargs["required"] = False
        kwargs["strip"] = False  # whitespace can be part of a password
        kwargs.pop("empty_value", None)
        super().__init__(**kwargs)
        self.allow_clear = allow_clear
        if isinstance(self.widget, SecretInput):
            self.widget.allow_clear = allow_clear

    def to_python(self, value: Any) -> Any:
        if value is _CLEAR:
            return ""
        if value in self.empty_values:
            return KEEP
        return str(value)

    def clean(self, value: Any) -> Any:
        value = self.to_python(value)
        if value is KEEP or value == "":
            return value
        self.validate(value)
        self.run_validators(value)
        return value

    def bound_data(self, data: Any, initial: Any) -> Any:
        # Re-rendering a bound form shows the stored state, never what was typed.
        return initial

    def has_changed(self, initial: Any, data: Any) -> bool:
        return data is _CLEAR or data not in self.empty_values
