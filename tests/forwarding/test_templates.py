"""Payload templates: ${path} placeholders, typed when alone, single pass, capped, inert."""

from __future__ import annotations

import orjson
import pytest

from apps.forwarding import template
from apps.forwarding.template import TemplateError

EVENT = {
    "id": "tel_1",
    "type": "telemetry",
    "ts": "2025-03-01T10:00:00+00:00",
    "seq": 7,
    "device": {"id": "alice-meter-1", "name": "Meter", "profile": "meter-v2"},
    "data": {
        "voltage": 230.5,
        "on": True,
        "relays": ["ON", "OFF"],
        "nested": {"a": 1},
        "none": None,
        "evil": '${data.secret}"}, "x": {"y',
        "secret": "must-not-leak",
    },
}


def body(tpl: object) -> object:
    template.validate(tpl)
    return orjson.loads(template.render_body(tpl, EVENT))


def test_a_lone_placeholder_keeps_the_json_type() -> None:
    out = body(
        {
            "v": "${data.voltage}",
            "on": "${data.on}",
            "relays": "${data.relays}",
            "nested": "${data.nested}",
            "seq": "${seq}",
            "none": "${data.none}",
            "missing": "${data.nope}",
        }
    )
    assert out == {
        "v": 230.5,
        "on": True,
        "relays": ["ON", "OFF"],
        "nested": {"a": 1},
        "seq": 7,
        "none": None,
        "missing": None,
    }


def test_placeholders_inside_text_become_text() -> None:
    out = body(["${device.id}/${data.voltage} V on=${data.on} ${data.relays.1} [${data.nope}]"])
    assert out == ["alice-meter-1/230.5 V on=true OFF []"]


def test_double_dollar_is_a_literal_dollar() -> None:
    assert body({"price": "$$5 and $${device.id}"}) == {"price": "$5 and ${device.id}"}


def test_without_template_the_body_is_the_standard_envelope() -> None:
    out = orjson.loads(template.render_body(None, EVENT))
    assert out == {"type": "telemetry", "timestamp": EVENT["ts"], "data": EVENT}


def test_an_event_value_cannot_inject_json_or_expand_again() -> None:
    # The value contains a placeholder and JSON punctuation: it stays one inert string.
    out = body({"a": "${data.evil}", "b": "x ${data.evil} y"})
    assert out == {"a": EVENT["data"]["evil"], "b": f"x {EVENT['data']['evil']} y"}
    assert "must-not-leak" not in orjson.dumps(out).decode()


@pytest.mark.parametrize(
    "path",
    [
        "data.__class__",
        "data.__class__.__mro__",
        "device.id.__len__",
        "data.voltage.real",
        "data.relays.5",
        "data.relays.-1",
    ],
)
def test_paths_reach_only_dict_keys_and_list_items(path: str) -> None:
    assert body({"x": "${" + path + "}"}) == {"x": None}


@pytest.mark.parametrize(
    "bad",
    [
        {"x": "${}"},
        {"x": "${data voltage}"},
        {"x": "${data.voltage"},
        {"x": "${{7*7}}"},
        {"x": "${__import__('os').system('id')}"},
        {"x": "${data.v|upper}"},
        {"${device.id}": 1},
        "just a string",
        42,
    ],
)
def test_it_refuses_what_is_not_a_plain_placeholder_template(bad: object) -> None:
    with pytest.raises(TemplateError):
        template.validate(bad)


def test_it_caps_the_template_size_and_depth() -> None:
    with pytest.raises(TemplateError, match="KiB"):
        template.validate({"x": "a" * (template.TEMPLATE_MAX_BYTES + 1)})
    deep: object = "${id}"
    for _ in range(template.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(TemplateError, match="nests"):
        template.validate(deep)


def test_it_caps_the_rendered_body() -> None:
    big = {**EVENT, "data": {"blob": "x" * (template.BODY_MAX_BYTES // 8)}}
    tpl = {"a": ["${data.blob}"] * 10}
    template.validate(tpl)
    with pytest.raises(TemplateError, match="exceeds"):
        template.render_body(tpl, big)
