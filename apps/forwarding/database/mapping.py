"""Column mappings: `column ← ${event.path}`, one per target column.

A mapping is stored as a list of `[column, expression]` pairs (order kept: it is the column
order of the statement and of the suggested CREATE TABLE). An expression is a payload-template
string (`template.py`): exactly one placeholder keeps the value's type (`${data.power}` stays a
number, `${data}` an object), longer text is interpolated (`${device.id}/${seq}`), text without
a placeholder is a constant. Same paths, same single-pass renderer as webhook payloads: nothing
an owner types is evaluated.

The forms show and take the mapping as text, one `column = ${path}` per line.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.utils import timezone

from .. import template
from . import identifiers
from .base import Family

MAX_COLUMNS = 100
MAX_EXPRESSION = 500

DEFAULT_MAPPING: list[list[str]] = [
    ["event_id", "${id}"],
    ["event_type", "${type}"],
    ["device_id", "${device.id}"],
    ["ts", "${ts}"],
    ["data", "${data}"],
]

# What the standard event fields are (`DeviceEvent.as_payload`), for suggesting column types
# without a sample value. Lengths follow the platform's own limits.
KNOWN_PATHS: dict[str, tuple[Family, int | None]] = {
    "id": (Family.TEXT, 64),
    "type": (Family.TEXT, 32),
    "ts": (Family.TIME, None),
    "received_at": (Family.TIME, None),
    "seq": (Family.INT, None),
    "device": (Family.JSON, None),
    "device.id": (Family.TEXT, 63),
    "device.name": (Family.TEXT, 200),
    "device.profile": (Family.TEXT, 32),
    "data": (Family.JSON, None),
}
TIME_PATHS = frozenset(p for p, (f, _n) in KNOWN_PATHS.items() if f is Family.TIME)

_LINE = re.compile(r"^\s*(?P<column>[^=←<\s]+)\s*(?:=|←|<-)\s*(?P<expr>.*?)\s*$")
_SINGLE = re.compile(r"\$\{([^{}]*)\}")


def single_path(expression: str) -> str | None:
    """The path when `expression` is exactly one placeholder (the typed case), else None."""
    match = _SINGLE.fullmatch(expression)
    return match.group(1) if match else None


# --- text form <-> stored form --------------------------------------------------------------


def parse(text: str) -> list[list[str]]:
    """Lines of `column = ${path}` (or `column ← ${path}`); blank lines and # comments skipped."""
    pairs: list[list[str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValidationError(f"Line {number}: write it as column = ${{path}}.")
        pairs.append([match.group("column"), match.group("expr")])
    return pairs


def as_text(mapping: list[list[str]]) -> str:
    return "\n".join(f"{column} = {expression}" for column, expression in mapping)


def validate(mapping: Any, key_columns: Any, upsert: bool) -> None:
    """Raise ValidationError unless the mapping and key columns are well-formed."""
    if not isinstance(mapping, list) or not mapping:
        raise ValidationError("Map at least one column.")
    if len(mapping) > MAX_COLUMNS:
        raise ValidationError(f"Map at most {MAX_COLUMNS} columns.")
    seen: set[str] = set()
    for pair in mapping:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ValidationError("Each mapping entry is a [column, expression] pair.")
        column, expression = pair
        identifiers.check(column, "column name")
        if column.lower() in seen:  # MySQL compares column names without case
            raise ValidationError(f"Column {column} is mapped twice.")
        seen.add(column.lower())
        if not isinstance(expression, str) or not expression.strip():
            raise ValidationError(f"Column {column} has no value; use ${{path}} or a constant.")
        if len(expression) > MAX_EXPRESSION:
            raise ValidationError(f"The value of {column} is too long.")
        try:
            template.validate({column: expression})
        except template.TemplateError as exc:
            raise ValidationError(f"Column {column}: {exc}") from None
    if not isinstance(key_columns, list):
        raise ValidationError("Key columns are a list.")
    for key in key_columns:
        identifiers.check(key, "key column")
        if key.lower() not in seen:
            raise ValidationError(f"Key column {key} is not among the mapped columns.")
    if upsert and not key_columns:
        raise ValidationError("Upsert needs key columns (for example event_id).")
    if len({k.lower() for k in key_columns}) != len(key_columns):
        raise ValidationError("A key column is listed twice.")


# --- rendering --------------------------------------------------------------------------------


class Renderer:
    """Renders events into row values, column by column; built once per destination config."""

    def __init__(self, mapping: list[list[str]]) -> None:
        self.columns = tuple(column for column, _e in mapping)
        self._steps: list[tuple[str, ...] | str] = []
        for _column, expression in mapping:
            path = single_path(expression)
            # The typed single-placeholder case is by far the most common: resolve it directly.
            self._steps.append(tuple(path.split(".")) if path is not None else expression)

    def render(self, event: dict[str, Any]) -> list[Any]:
        values: list[Any] = []
        for step in self._steps:
            if isinstance(step, tuple):
                value: Any = event
                for key in step:
                    if isinstance(value, dict):
                        value = value.get(key)
                    elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                        value = value[int(key)]
                    else:
                        value = None
                    if value is None:
                        break
                values.append(value)
            else:
                values.append(template.render(step, event))
        return values


# --- types ------------------------------------------------------------------------------------


def parse_time(value: str) -> datetime | None:
    """An ISO 8601 timestamp (what events carry) as an aware datetime, else None."""
    if len(value) < 10 or value[4:5] != "-":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def family_of(value: Any, path: str | None = None) -> Family | None:
    """The family of a rendered value (None for null: it fits any nullable column)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return Family.BOOL
    if isinstance(value, int):
        return Family.INT
    if isinstance(value, float):
        return Family.FLOAT
    if isinstance(value, dict | list):
        return Family.JSON
    if isinstance(value, str):
        if path in TIME_PATHS or parse_time(value) is not None:
            return Family.TIME
        return Family.TEXT
    return Family.OTHER


_TRUE = {"true", "on", "yes", "1", "t", "y"}
_FALSE = {"false", "off", "no", "0", "f", "n"}


def mismatch(value: Any, path: str | None, column: Family) -> str | None:
    """Why `value` cannot go into a column of family `column`, or None when it fits."""
    found = family_of(value, path)
    if found is None or column in (Family.TEXT, Family.JSON, Family.OTHER):
        return None
    if column is Family.INT:
        if found in (Family.INT, Family.BOOL):
            return None
        if found is Family.FLOAT:
            return None if float(value).is_integer() else "a decimal number"
        if found is Family.TEXT and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return None
    elif column is Family.FLOAT:
        if found in (Family.INT, Family.FLOAT, Family.BOOL):
            return None
        if found is Family.TEXT and _is_number(value):
            return None
    elif column is Family.BOOL:
        if found is Family.BOOL or (found is Family.INT and value in (0, 1)):
            return None
        if found is Family.TEXT and value.strip().lower() in _TRUE | _FALSE:
            return None
    elif column is Family.TIME and found is Family.TIME:
        return None
    return {
        Family.INT: "a whole number",
        Family.FLOAT: "a decimal number",
        Family.BOOL: "true/false",
        Family.TEXT: "text",
        Family.TIME: "a timestamp",
        Family.JSON: "an object or list",
        Family.OTHER: "a value",
    }[found]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def as_bool(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def suggested_family(expression: str, sample: dict[str, Any] | None) -> tuple[Family, int | None]:
    """The column type to suggest for an expression: from the event contract, else from a
    sample event's value, else text."""
    path = single_path(expression)
    if path is None:
        return Family.TEXT, None
    if path in KNOWN_PATHS:
        return KNOWN_PATHS[path]
    if sample is not None:
        found = family_of(template.resolve(sample, path), path)
        if found is not None:
            return found, None
    if path.startswith("data."):
        return Family.FLOAT, None  # readings are mostly numbers; the owner may edit the DDL
    return Family.TEXT, None


def sample_event(owner_id: int | None = None) -> dict[str, Any]:
    """An event to render for Test Connection and type suggestions: the owner's latest
    delivered payload when there is one (real field types), else a representative reading."""
    from ..models import Delivery

    if owner_id is not None:
        latest = (
            Delivery.objects.filter(owner_id=owner_id, event_type="telemetry")
            .order_by("-id")
            .values_list("payload", flat=True)
            .first()
        )
        if isinstance(latest, dict):
            return latest
    now = timezone.now().isoformat()
    return {
        "id": "tel_sample",
        "type": "telemetry",
        "ts": now,
        "received_at": now,
        "seq": 1,
        "device": {"id": "sample-meter-1", "name": "Sample meter", "profile": "meter-v2"},
        "data": {"voltage": 230.1, "current": 1.52, "power": 349.8, "energy": 1234.5},
    }
