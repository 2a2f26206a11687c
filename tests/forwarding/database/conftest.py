"""Owners' databases for the database-destination tests: each test gets a PostgreSQL or MariaDB
database of its own on the machine's real servers (created here, dropped afterwards), reached on
loopback, which the egress guard is told to allow."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pytest

from apps.forwarding import kinds, outbox
from apps.forwarding.database.models import DatabaseDestination
from apps.owners.models import Owner
from tests.services import require_mariadb, require_postgres

_names = itertools.count(1)


@dataclass
class TargetDB:
    """An owner's database: where it is, and a way to look into it as its administrator."""

    engine: str
    host: str
    port: int
    user: str
    database: str
    admin_url: str
    _conns: list[Any] = field(default_factory=list)

    def connect(self, database: str | None = None) -> Any:
        if self.engine == "postgres":
            import psycopg

            conn = psycopg.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                dbname=database or self.database,
                autocommit=True,
            )
        else:
            import pymysql

            conn = pymysql.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                database=database or self.database,
                autocommit=True,
            )
        self._conns.append(conn)
        return conn

    def execute(self, statement: str, params: Any = None) -> list[tuple]:
        conn = self._conns[0] if self._conns else self.connect()
        if self.engine == "postgres":
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall()) if cur.description else []

    def rows(self, table: str, order: str = "") -> list[tuple]:
        quote = '"' if self.engine == "postgres" else "`"
        order_by = f" ORDER BY {order}" if order else ""
        return self.execute(f"SELECT * FROM {quote}{table}{quote}{order_by}")

    def count(self, table: str) -> int:
        quote = '"' if self.engine == "postgres" else "`"
        return self.execute(f"SELECT count(*) FROM {quote}{table}{quote}")[0][0]

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()


def _postgres() -> Iterator[TargetDB]:
    import psycopg

    url = urlparse(require_postgres())
    name = f"dbsink_{uuid.uuid4().hex[:10]}"
    admin = dict(
        host=url.hostname, port=url.port or 5432, user=url.username or "postgres", autocommit=True
    )
    with psycopg.connect(dbname=(url.path or "/postgres").lstrip("/"), **admin) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    target = TargetDB(
        "postgres", url.hostname or "127.0.0.1", admin["port"], admin["user"], name, url.geturl()
    )
    try:
        yield target
    finally:
        target.close()
        with psycopg.connect(dbname=(url.path or "/postgres").lstrip("/"), **admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _mariadb() -> Iterator[TargetDB]:
    import pymysql

    url = urlparse(require_mariadb())
    name = f"dbsink_{uuid.uuid4().hex[:10]}"
    admin = dict(host=url.hostname, port=url.port or 3306, user=url.username or "root")
    conn = pymysql.connect(autocommit=True, **admin)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    conn.close()
    target = TargetDB(
        "mysql", url.hostname or "127.0.0.1", admin["port"], admin["user"], name, url.geturl()
    )
    try:
        yield target
    finally:
        target.close()
        conn = pymysql.connect(autocommit=True, **admin)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture
def allow_loopback(settings) -> None:
    settings.EGRESS_ALLOW = ["127.0.0.1/32"]


@pytest.fixture(autouse=True)
def _fresh_database_transport() -> Iterator[None]:
    # Each test starts without pooled connections or remembered health, and leaves no writer
    # thread holding a connection to a database that is about to be dropped.
    yield
    kinds.transport("database").close()


@pytest.fixture
def postgres_db(allow_loopback) -> Iterator[TargetDB]:
    yield from _postgres()


@pytest.fixture
def mariadb_db(allow_loopback) -> Iterator[TargetDB]:
    yield from _mariadb()


@pytest.fixture(params=["postgres", "mysql"])
def target_db(request, allow_loopback) -> Iterator[TargetDB]:
    """Each test using it runs once against PostgreSQL and once against MariaDB."""
    yield from (_postgres() if request.param == "postgres" else _mariadb())


# --- tables ---------------------------------------------------------------------------------

READINGS_PG = """
CREATE TABLE readings (
    event_id varchar(64) PRIMARY KEY,
    device_id varchar(63) NOT NULL,
    ts timestamptz NOT NULL,
    power double precision CHECK (power >= 0),
    data jsonb
)
"""
READINGS_MYSQL = """
CREATE TABLE readings (
    event_id varchar(64) PRIMARY KEY,
    device_id varchar(63) NOT NULL,
    ts datetime(6) NOT NULL,
    power double CHECK (power >= 0),
    data json
) ENGINE=InnoDB
"""
READINGS_MAPPING = [
    ["event_id", "${id}"],
    ["device_id", "${device.id}"],
    ["ts", "${ts}"],
    ["power", "${data.power}"],
    ["data", "${data}"],
]


def create_readings(db: TargetDB, append: bool = False) -> None:
    statement = READINGS_PG if db.engine == "postgres" else READINGS_MYSQL
    if append:  # no key: every delivery is a new row
        statement = statement.replace("varchar(64) PRIMARY KEY", "varchar(64) NOT NULL")
    db.execute(statement)


def make_db_destination(owner: Owner, db: TargetDB, **fields: Any) -> DatabaseDestination:
    fields.setdefault("name", f"{db.engine}-{next(_names)}")
    fields.setdefault("table", "readings")
    fields.setdefault("column_mapping", [list(p) for p in READINGS_MAPPING])
    fields.setdefault("tls_mode", "disable")
    fields.setdefault("flush_interval_ms", 0)
    destination = DatabaseDestination(
        owner=owner,
        engine=db.engine,
        host=fields.pop("host", db.host),
        port=fields.pop("port", db.port),
        database_name=fields.pop("database_name", db.database),
        schema="public" if db.engine == "postgres" else "",
        username=fields.pop("username", db.user),
        # PostgreSQL trusts loopback here; MariaDB's root has no password.
        password=fields.pop("password", "trusted" if db.engine == "postgres" else ""),
        **fields,
    )
    destination.full_clean()
    destination.save()
    outbox.forget_routes()
    return destination


def events_of(destination: DatabaseDestination, **filters: Any) -> int:
    """Events in the destination's outbox rows (a row carries a batch of them, see
    `outbox.write_outbox`), filtered like `Delivery.objects.filter`."""
    from apps.forwarding.models import Delivery

    return Delivery.objects.filter(destination=destination, **filters).events()
