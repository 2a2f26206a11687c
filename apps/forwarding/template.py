"""Payload templates and event paths: `${path}` placeholders over an event, nothing more.

A template is a JSON document. In its string values, `${path}` is replaced by the value at that
path of the event (`${device.id}`, `${data.voltage}`, `${data.relays.0}`, `${ts}`; see
`DeviceEvent.as_payload`). A string that is exactly one placeholder takes the value with its JSON
type (number, boolean, object, null when missing); inside longer text the value is written as
text. `$$` is a literal `$`. Object keys are literal.

Deliberately not a template language: one regular-expression pass, no expressions, filters,
attribute access or loops, so an owner's template cannot run code or reach anything but the event
dict. Values are substituted after parsing and serialised by the JSON encoder, so an event value
containing quotes or `${…}` can neither break the document nor be expanded (single pass).
Column mappings of database destinations use the same paths (`resolve`).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

TEMPLATE_MAX_BYTES = 16 * 1024
BODY_MAX_BYTES = 256 * 1024
MAX_DEPTH = 20

_TOKEN = re.compile(r"\$\$|\$\{([^{}]*)\}")
_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+){0,15}")
_MISSING = object()


class TemplateError(ValueError):
    pass


def resolve(event: dict[str, Any], path: str) -> Any:
    """The value at dotted `path` of `event`; None when any step is missing. Dicts by key,
    lists by index, nothing else (no attributes, no calls)."""
    value: Any = event
    for step in path.split("."):
        if isinstance(value, dict):
            value = value.get(step, _MISSING)
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return None
        if value is _MISSING:
            return None
    return value


def validate_path(path: str) -> None:
    if not _PATH.fullmatch(path):
        raise TemplateError(f"${{{path}}} is not a path like ${{data.voltage}}")


def _validate_string(text: str) -> None:
    for match in _TOKEN.finditer(text):
        if match.group(1) is not None:
            validate_path(match.group(1))
    if "${" in _TOKEN.sub("", text):
        raise TemplateError(f"unclosed or malformed placeholder in {text[:60]!r}")


def validate(template: Any) -> None:
    """Raise TemplateError unless `template` is a JSON document within the limits whose
    placeholders are all well-formed paths."""
    if len(orjson.dumps(template)) > TEMPLATE_MAX_BYTES:
        raise TemplateError(f"a template is at most {TEMPLATE_MAX_BYTES // 1024} KiB")
    if not isinstance(template, dict | list):
        raise TemplateError("a template is a JSON object or array")

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise TemplateError(f"a template nests at most {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                if "${" in key:
                    raise TemplateError("placeholders go in values, not in keys")
                walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1)
        elif isinstance(node, str):
            _validate_string(node)

    walk(template, 0)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _render_string(text: str, event: dict[str, Any]) -> Any:
    whole = _TOKEN.fullmatch(text)
    if whole and whole.group(1) is not None:
        return resolve(event, whole.group(1))  # typed: the value itself

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "$"
        return _as_text(resolve(event, match.group(1)))

    return _TOKEN.sub(substitute, text)


def render(template: Any, event: dict[str, Any]) -> Any:
    if isinstance(template, dict):
        return {key: render(value, event) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, event) for value in template]
    if isinstance(template, str) and "$" in template:
        return _render_string(template, event)
    return template


def envelope(event: dict[str, Any]) -> dict[str, Any]:
    """The standard body without a template: {"type", "timestamp", "data": event}."""
    return {"type": event.get("type"), "timestamp": event.get("ts"), "data": event}


def render_body(template: Any | None, event: dict[str, Any]) -> bytes:
    document = envelope(event) if template is None else render(template, event)
    body = orjson.dumps(document)
    if len(body) > BODY_MAX_BYTES:
        raise TemplateError(f"the rendered body exceeds {BODY_MAX_BYTES // 1024} KiB")
    return body
