"""MySQL and MariaDB targets, with PyMySQL (pure Python: no system library to build).

Connecting: the host is resolved through the egress guard, and the socket is opened here, to the
validated address, then handed to PyMySQL (`defer_connect` + `connect(sock)`): PyMySQL would
otherwise resolve the name again itself. TLS still verifies the name the owner typed (PyMySQL
uses `host` as the server name). `LOCAL INFILE` is off (the client capability is not even
announced), no option file is read, and no Unix socket can be named.

Session: strict SQL mode (a value that does not fit is an error, never silently truncated — and
without NO_BACKSLASH_ESCAPES, which PyMySQL's escaping would also handle), UTC, bounded lock
waits and statement time.

Writing: one multi-row `INSERT … VALUES (…), (…)` per batch (PyMySQL's `executemany` joins the
rows into statements of at most ~1 MB), with `ON DUPLICATE KEY UPDATE` for upsert; an unchanged
row is not rewritten. PyMySQL binds values by escaping them on the client (it has no server-side
parameters); identifiers, which it cannot quote, are quoted by `identifiers.mysql_quote`.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC
from typing import Any

import orjson
import pymysql
from pymysql.connections import Connection

from .. import egress
from . import mapping
from .base import (
    CONNECT_TIMEOUT,
    LOCK_TIMEOUT,
    STATEMENT_TIMEOUT,
    Column,
    ConnectionSettings,
    ErrorClass,
    Family,
    SinkError,
    TableInfo,
    Target,
    network_error,
)
from .identifiers import mysql_quote as q

log = logging.getLogger(__name__)

SQL_MODE = (
    "STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
    "NO_ENGINE_SUBSTITUTION"
)
TRANSACTIONAL_ENGINES = {"innodb", "rocksdb", "tokudb", "ndbcluster", "ndb"}

# Server error numbers (https://mariadb.com/kb/en/mariadb-error-code-reference/).
_CONTENT = {
    1048,  # column cannot be null
    1062,  # duplicate entry
    1263,  # null into NOT NULL (multi-row)
    1264,  # out of range
    1265,  # data truncated
    1292,  # incorrect datetime/number value
    1300,  # invalid character string
    1366,  # incorrect integer/string value
    1367,  # illegal value
    1406,  # data too long
    1451,  # foreign key (parent)
    1452,  # foreign key (child)
    1690,  # value out of range
    3140,  # invalid JSON (MySQL)
    3819,  # check constraint (MySQL)
    4025,  # check constraint (MariaDB)
}
_DESTINATION = {
    1044: "The account may not use this database.",
    1045: "The database refused the login (user or password).",
    1698: "The database refused the login (user or password).",
    1049: "The database does not exist.",
    1142: "The account lacks a privilege on the table (INSERT, and UPDATE for upsert).",
    1143: "The account lacks a privilege on a mapped column.",
    1146: "The table does not exist.",
    1054: "A mapped column does not exist in the table.",
    1227: "The account lacks a privilege this write needs.",
    1290: "The database is read-only.",
    1792: "The database is read-only.",
    1036: "The table is read-only.",
    2026: "TLS could not be set up with the server (does it offer TLS?).",
}
_TRANSIENT = {
    1021,  # disk full
    1040,  # too many connections
    1053,  # server shutdown
    1114,  # table full
    1203,  # max user connections
    1205,  # lock wait timeout
    1213,  # deadlock
    1317,  # query interrupted
    1927,  # connection killed
    1969,  # statement time exceeded (MariaDB)
    3024,  # statement time exceeded (MySQL)
}
_NETWORK = {2002, 2003, 2005, 2006, 2013, 2055}

FAMILIES = {
    "tinyint": Family.INT,
    "smallint": Family.INT,
    "mediumint": Family.INT,
    "int": Family.INT,
    "bigint": Family.INT,
    "decimal": Family.FLOAT,
    "float": Family.FLOAT,
    "double": Family.FLOAT,
    "bit": Family.BOOL,
    "char": Family.TEXT,
    "varchar": Family.TEXT,
    "tinytext": Family.TEXT,
    "text": Family.TEXT,
    "mediumtext": Family.TEXT,
    "longtext": Family.TEXT,
    "enum": Family.TEXT,
    "set": Family.TEXT,
    "datetime": Family.TIME,
    "timestamp": Family.TIME,
    "date": Family.TIME,
    "json": Family.JSON,
}
DDL_TYPES = {
    Family.INT: "BIGINT",
    Family.FLOAT: "DOUBLE",
    Family.BOOL: "BOOLEAN",
    Family.TEXT: "VARCHAR(255)",
    Family.TIME: "DATETIME(6)",
    Family.JSON: "JSON",
    Family.OTHER: "TEXT",
}
DDL_RIGHTS = {"CREATE", "DROP", "ALTER", "INDEX", "TRIGGER", "CREATE VIEW", "ALTER ROUTINE"}


# --- connecting -----------------------------------------------------------------------------


def _tls_context(mode: str) -> ssl.SSLContext | None:
    if mode == "disable":
        return None
    context = ssl.create_default_context()  # the system's CAs
    if mode == "require":  # encrypt, without checking who answers (as libpq's "require")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        context.check_hostname = False
    return context


def connect(settings: ConnectionSettings, timeout: float = CONNECT_TIMEOUT) -> Connection:
    try:
        addresses = egress.resolve_checked(settings.host, settings.port, timeout=timeout)
    except egress.EgressDenied as exc:
        log.warning("mysql %s: %s", settings.context, exc)
        raise network_error() from None
    tls = _tls_context(settings.tls_mode)
    for address in addresses:
        conn = Connection(
            host=settings.host,  # only the TLS server name: the socket is ours
            port=settings.port,
            user=settings.username,
            password=settings.password.reveal() if settings.password else "",
            database=settings.database,
            charset="utf8mb4",
            connect_timeout=timeout,
            read_timeout=STATEMENT_TIMEOUT + 10,
            write_timeout=STATEMENT_TIMEOUT + 10,
            local_infile=False,
            autocommit=False,
            ssl=tls,
            ssl_disabled=tls is None,
            sql_mode=SQL_MODE,
            program_name="iotplatform-delivery",
            defer_connect=True,
        )
        try:
            sock = socket.create_connection((address, settings.port), timeout)
        except OSError as exc:
            log.info("mysql %s: cannot connect to %s: %s", settings.context, address, exc)
            continue
        try:
            # The address connected to, checked once more (it is a literal: no DNS in between).
            egress.check_address(sock.getpeername()[0], settings.host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.connect(sock)
            _setup(conn)
        except (pymysql.MySQLError, OSError) as exc:
            sock.close()
            error = classify(exc)
            log.info("mysql %s: connect failed: %r", settings.context, exc)
            raise error from None
        return conn
    raise network_error()


def _setup(conn: Connection) -> None:
    mariadb = "mariadb" in conn.get_server_info().lower()
    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+00:00'")
        cur.execute("SET SESSION innodb_lock_wait_timeout = %s", (LOCK_TIMEOUT,))
        # Table (metadata) locks too: LOCK TABLES elsewhere must not hold a batch for a year.
        cur.execute("SET SESSION lock_wait_timeout = %s", (LOCK_TIMEOUT,))
        if mariadb:
            cur.execute("SET SESSION max_statement_time = %s", (STATEMENT_TIMEOUT,))
    conn.commit()


def tls_in_use(conn: Connection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cur.fetchone()
    conn.rollback()
    return bool(row and row[1])


def ping(conn: Connection) -> None:
    conn.ping(reconnect=False)


# --- errors -----------------------------------------------------------------------------------


def classify(exc: BaseException) -> SinkError:
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, OSError):
        return network_error()
    if not isinstance(exc, pymysql.MySQLError):
        return SinkError(ErrorClass.TRANSIENT, "Unexpected error while writing.")
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if code in _CONTENT:
        return SinkError(ErrorClass.CONTENT, text)
    if code in _DESTINATION:
        return SinkError(ErrorClass.DESTINATION, _DESTINATION[code])
    if code in _NETWORK or isinstance(exc, pymysql.err.InterfaceError):
        return network_error()
    if code in _TRANSIENT:
        return SinkError(ErrorClass.TRANSIENT, text)
    return SinkError(ErrorClass.TRANSIENT, text or "Unexpected database error.")


# --- the table --------------------------------------------------------------------------------


def _family(data_type: str, column_type: str) -> Family:
    if column_type.lower().startswith("tinyint(1)"):
        return Family.BOOL  # what BOOLEAN means in MySQL
    return FAMILIES.get(data_type.lower(), Family.OTHER)


def table_info(conn: Connection, schema: str, table: str) -> TableInfo | None:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT ENGINE FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (schema, table),
        )
        found = cur.fetchone()
        if found is None:
            conn.rollback()
            return None
        cur.execute(
            """
            SELECT COLUMN_NAME, COLUMN_TYPE, DATA_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA
            FROM information_schema.COLUMNS
            WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s
            ORDER BY ORDINAL_POSITION
            """,
            (schema, table),
        )
        columns = {}
        for name, column_type, data_type, nullable, default, extra in cur.fetchall():
            extra = (extra or "").lower()
            columns[name] = Column(
                name,
                column_type,
                _family(data_type, column_type),
                nullable == "YES",
                default is not None or "auto_increment" in extra or "generated" in extra,
            )
        cur.execute(
            """
            SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS
            WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND NON_UNIQUE = 0
            """,
            (schema, table),
        )
        keys: dict[str, set[str]] = {}
        for index, column in cur.fetchall():
            keys.setdefault(index, set()).add(column)
    conn.rollback()
    return TableInfo(
        columns,
        tuple(frozenset(k) for k in keys.values()),
        transactional=(found[0] or "").lower() in TRANSACTIONAL_ENGINES,
    )


def privilege_warnings(conn: Connection, schema: str, table: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        user, _, host = cur.fetchone()[0].rpartition("@")
        grantee = f"'{user}'@'{host}'"
        cur.execute(
            "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = %s",
            (grantee,),
        )
        global_rights = {row[0] for row in cur.fetchall()}
        cur.execute(
            "SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES"
            " WHERE GRANTEE = %s AND %s LIKE TABLE_SCHEMA",
            (grantee, schema),
        )
        schema_rights = {row[0] for row in cur.fetchall()}
        cur.execute(
            "SELECT PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES"
            " WHERE GRANTEE = %s AND TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (grantee, schema, table),
        )
        table_rights = {row[0] for row in cur.fetchall()}
    conn.rollback()
    warnings = []
    if "SUPER" in global_rights:
        warnings.append("the account is a superuser (SUPER)")
    ddl = sorted((global_rights | schema_rights | table_rights) & DDL_RIGHTS)
    if ddl:
        warnings.append("the account has DDL rights: " + ", ".join(ddl))
    return warnings


# --- values -----------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    # PyMySQL would write NaN as a bare `nan` (an unknown column to the server).
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    if isinstance(value, dict | list):
        raise ValueError("an object or list does not fit this column")
    return value


def _to_time(value: Any) -> Any:
    if isinstance(value, str):
        parsed = mapping.parse_time(value)
        if parsed is not None:
            # The session runs in UTC; DATETIME keeps what it is given, so give it UTC.
            return parsed.astimezone(UTC).replace(tzinfo=None)
    return _finite(value)


def _text(value: Any) -> Any:
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return _finite(value)


def converter(column: Column) -> Any:
    family = column.family
    if family in (Family.TEXT, Family.JSON, Family.OTHER):
        return _text
    if family is Family.TIME:
        return _to_time
    if family is Family.BOOL:
        return lambda v: _finite(mapping.as_bool(v))
    return lambda v: int(v) if isinstance(v, bool) else _finite(v)


# --- writing ----------------------------------------------------------------------------------


def prepare(conn: Connection, target: Target) -> None:
    """Nothing to set up: the multi-row INSERT needs no staging."""


def insert_sql(target: Target) -> str:
    columns = ", ".join(q(c) for c in target.columns)
    row = "(" + ", ".join(["%s"] * len(target.columns)) + ")"
    table = f"{q(target.schema)}.{q(target.table)}"
    # Identifiers validated and quoted by `q`; values are bound by the driver.
    statement = f"INSERT INTO {table} ({columns}) VALUES {row}"  # noqa: S608
    if target.upsert:
        keys = {k.lower() for k in target.key_columns}
        updated = [c for c in target.columns if c.lower() not in keys]
        if updated:
            # VALUES(col) works on MariaDB and MySQL (8.0.20+ prefers an alias, which MariaDB
            # lacks). Note: MySQL upserts on a conflict with ANY unique key of the table.
            sets = ", ".join(f"{q(c)} = VALUES({q(c)})" for c in updated)
        else:
            sets = f"{q(target.key_columns[0])} = {q(target.key_columns[0])}"
        statement += " ON DUPLICATE KEY UPDATE " + sets
    return statement


def write(conn: Connection, target: Target, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(insert_sql(target), rows)


@contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    conn.begin()
    try:
        yield
    except BaseException:
        with suppress(pymysql.MySQLError):
            conn.rollback()
        raise
    conn.commit()


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT batch_part")
        try:
            yield
        except pymysql.MySQLError:
            cur.execute("ROLLBACK TO SAVEPOINT batch_part")
            raise
        cur.execute("RELEASE SAVEPOINT batch_part")


def rollback_write(conn: Connection, target: Target, row: Sequence[Any]) -> None:
    conn.begin()
    try:
        write(conn, target, [row])
    finally:
        conn.rollback()


def ddl(target: Target, types: Sequence[tuple[str, Family, int | None]]) -> str:
    lines = []
    if not target.upsert and "id" not in target.columns:
        lines.append("    `id` BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY")
    for name, family, length in types:
        kind = f"VARCHAR({length})" if family is Family.TEXT and length else DDL_TYPES[family]
        null = " NOT NULL" if name in target.key_columns else " NULL"
        lines.append(f"    {q(name)} {kind}{null}")
    if target.key_columns:
        lines.append(f"    PRIMARY KEY ({', '.join(q(k) for k in target.key_columns)})")
    body = ",\n".join(lines)
    return (
        f"CREATE TABLE IF NOT EXISTS {q(target.schema)}.{q(target.table)} (\n{body}\n)"
        " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;"
    )


def execute_ddl(conn: Connection, statement: str) -> None:
    with conn.cursor() as cur:
        cur.execute(statement.rstrip(";"))  # ours, from quoted identifiers; DDL commits itself
    conn.commit()
