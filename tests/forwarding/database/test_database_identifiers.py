"""Names an owner types never become SQL: a hostile corpus of schema, table, column, key and
database names (quotes, backticks, semicolons, comments, 64+ characters, non-ASCII look-alikes,
NUL) is refused by validation, and the quoting helpers refuse it too; hosts that would reach a
Unix socket or a list of servers are refused. No database needed: nothing reaches one."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from psycopg import sql

from apps.forwarding.database import identifiers, mapping, postgres
from apps.forwarding.database.base import Target
from apps.forwarding.database.models import DatabaseDestination

HOSTILE = [
    'readings"; DROP TABLE users; --',
    "readings`; DROP TABLE users; --",
    "readings'; DROP TABLE users; --",
    'a"b',
    "a`b",
    "a'b",
    "a;b",
    "a b",
    "a--b",
    "a/*b*/",
    "a.b",
    "a-b",
    "a\x00b",
    "a\nb",
    "1readings",
    "x" * 64,
    "r" * 63 + "é",
    "tablé",
    "таблица",  # Cyrillic
    "ｒｅａｄｉｎｇｓ",  # full-width Latin look-alike
    "readings\u200b",  # zero-width space
    "$1",
    "",
]
HOSTILE_HOSTS = [
    "/var/run/postgresql",
    "@abstract-socket",
    "db1.example.com,db2.example.com",
    "db.example.com:5432",
    "user@db.example.com",
    "-oProxyCommand=x",
    "db example.com",
    "db.example.com/dbname",
    "[::1]",
    "",
]


def destination(**fields) -> DatabaseDestination:
    values = dict(
        owner_id=1,
        name="d",
        engine="postgres",
        host="93.184.216.34",
        database_name="owner_db",
        schema="public",
        username="writer",
        table="readings",
    )
    values.update(fields)
    return DatabaseDestination(**values)


def errors_of(obj: DatabaseDestination) -> dict[str, list[str]]:
    try:
        obj.clean_fields(exclude=["owner", "devices", "password"])
        obj.clean()
    except ValidationError as exc:
        return exc.message_dict
    return {}


@pytest.mark.parametrize(
    ("field", "name"),
    [
        (field, name)
        for field in ("table", "schema", "database_name")
        for name in HOSTILE
        if not (field == "schema" and name == "")  # empty: PostgreSQL's default, public
    ],
)
def test_hostile_names_are_refused(field, name, settings) -> None:
    settings.EGRESS_ALLOW = ["93.184.216.34/32"]
    errors = errors_of(destination(**{field: name}))
    assert field in errors, (field, name)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_column_and_key_names_are_refused(name) -> None:
    with pytest.raises(ValidationError):
        mapping.validate([[name, "${id}"]], [], upsert=False)
    with pytest.raises(ValidationError):
        mapping.validate([["event_id", "${id}"]], [name], upsert=True)


@pytest.mark.parametrize("name", HOSTILE)
def test_the_mysql_quoting_helper_refuses_them_too(name) -> None:
    with pytest.raises(ValidationError):
        identifiers.mysql_quote(name)


def test_plain_names_are_quoted_by_the_drivers_api() -> None:
    assert identifiers.mysql_quote("readings") == "`readings`"
    target = Target("public", "Readings", ("event_id", "power"), ("event_id",), True)
    text = postgres.upsert_sql(target, 1).as_string(None)
    assert text.startswith('INSERT INTO "public"."Readings" AS t ("event_id", "power") VALUES')
    assert 'ON CONFLICT ("event_id")' in text
    # And psycopg's identifier quoting doubles quotes, should anything ever get past validation.
    assert sql.Identifier('a"b').as_string(None) == '"a""b"'


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
def test_hosts_that_are_not_one_name_or_address_are_refused(host, settings) -> None:
    settings.EGRESS_ALLOW = ["0.0.0.0/0"]
    assert "host" in errors_of(destination(host=host))


def test_a_mapping_value_cannot_inject_either() -> None:
    """Values are rendered by the template engine (no code) and always bound as parameters;
    an expression is only ever text to render."""
    with pytest.raises(ValidationError):
        mapping.validate([["a", "${__import__('os')}"]], [], upsert=False)
    with pytest.raises(ValidationError):
        mapping.validate([["a", "${data.x"]], [], upsert=False)
    renderer = mapping.Renderer([["a", "'); DROP TABLE t; --"], ["b", "${data.x}"]])
    assert renderer.render({"data": {"x": "${id}"}}) == ["'); DROP TABLE t; --", "${id}"]


def test_a_mysql_destination_has_no_schema(settings) -> None:
    settings.EGRESS_ALLOW = ["93.184.216.34/32"]
    errors = errors_of(destination(engine="mysql", schema="other"))
    assert "schema" in errors
    assert not errors_of(destination(engine="mysql", schema=""))
