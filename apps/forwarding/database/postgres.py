"""PostgreSQL targets, with psycopg 3.

Connecting: the host is resolved through the egress guard and the connection is made to the
validated address (`hostaddr`), while `host` keeps the name for TLS verification — so the address
checked is the address connected to, whatever DNS says a millisecond later. libpq's own sources of
settings are closed: no password file, no client certificate, no GSSAPI, and every parameter is
passed explicitly (environment variables like PGHOST only fill parameters left out).

Writing: append mode streams the batch with COPY (the fastest path PostgreSQL has; FACTS.md
~99k rows/s); upsert mode is one multi-row `INSERT … ON CONFLICT (keys) DO UPDATE`, whose update
is skipped when nothing changes (`IS DISTINCT FROM`), so replaying a batch leaves the table,
not just its values, untouched. Identifiers are composed with `psycopg.sql.Identifier`, values
are always parameters.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Json, Jsonb

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

log = logging.getLogger(__name__)

MAX_PARAMS = 60_000  # the protocol allows 65,535 parameters per statement

TLS_MODES = {
    "disable": "disable",
    "require": "require",
    "verify-ca": "verify-ca",
    "verify-full": "verify-full",
}

# SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_CONTENT_CLASSES = ("22", "23")  # data exception, integrity constraint violation
_DESTINATION_CODES = {
    "3D000": "The database does not exist.",
    "3F000": "The schema does not exist.",
    "42P01": "The table does not exist.",
    "42703": "A mapped column does not exist in the table.",
    "42501": "The account lacks a privilege on the table (INSERT, and UPDATE for upsert).",
    "42P10": "Upsert needs a unique index or primary key on exactly the key columns.",
    "42804": "A mapped value does not fit its column's type.",
    "42846": "A mapped value cannot be converted to its column's type.",
    "25006": "The database is read-only (a standby?).",
}
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58", "XX")
_TRANSIENT_CODES = {"55P03", "55006", "55000"}  # lock not available, object in use

FAMILIES = {
    "smallint": Family.INT,
    "integer": Family.INT,
    "bigint": Family.INT,
    "numeric": Family.FLOAT,
    "real": Family.FLOAT,
    "double precision": Family.FLOAT,
    "boolean": Family.BOOL,
    "text": Family.TEXT,
    "character varying": Family.TEXT,
    "character": Family.TEXT,
    "citext": Family.TEXT,
    "timestamp with time zone": Family.TIME,
    "timestamp without time zone": Family.TIME,
    "date": Family.TIME,
    "json": Family.JSON,
    "jsonb": Family.JSON,
}
DDL_TYPES = {
    Family.INT: "bigint",
    Family.FLOAT: "double precision",
    Family.BOOL: "boolean",
    Family.TEXT: "text",
    Family.TIME: "timestamptz",
    Family.JSON: "jsonb",
    Family.OTHER: "text",
}

Connection = psycopg.Connection[Any]


# --- connecting -----------------------------------------------------------------------------


def _login_failure(text: str) -> SinkError | None:
    """Classify a refusal the server sent while connecting (libpq gives no SQLSTATE there)."""
    fatal = text.split("FATAL:", 1)[1].strip() if "FATAL:" in text else ""
    if not fatal:
        return None
    lowered = fatal.lower()
    if "starting up" in lowered or "shutting down" in lowered or "recovery" in lowered:
        return SinkError(ErrorClass.TRANSIENT, "The database server is restarting.")
    if "too many" in lowered or "connection slots" in lowered:
        return SinkError(ErrorClass.TRANSIENT, "The database server has no free connection.")
    if "database" in lowered and "does not exist" in lowered:
        return SinkError(ErrorClass.DESTINATION, "The database does not exist.")
    if "permission denied for database" in lowered:
        return SinkError(ErrorClass.DESTINATION, "The account may not connect to the database.")
    # Wrong password, unknown role, no pg_hba entry: one text, so that it cannot be used to
    # find out which user names exist.
    return SinkError(ErrorClass.DESTINATION, "The database refused the login (user or password).")


def connect(settings: ConnectionSettings, timeout: float = CONNECT_TIMEOUT) -> Connection:
    try:
        addresses = egress.resolve_checked(settings.host, settings.port, timeout=timeout)
    except egress.EgressDenied as exc:
        log.warning("postgres %s: %s", settings.context, exc)
        raise network_error() from None
    last: Exception | None = None
    for address in addresses:
        try:
            conn = psycopg.connect(
                host=settings.host,
                hostaddr=address,
                port=settings.port,
                dbname=settings.database,
                user=settings.username,
                password=settings.password.reveal() if settings.password else "",
                sslmode=TLS_MODES[settings.tls_mode],
                # System CAs for verification (libpq ≥ 16); "require" only encrypts.
                **({"sslrootcert": "system"} if settings.tls_mode.startswith("verify") else {}),
                sslcertmode="disable",  # never present the worker's own client certificate
                gssencmode="disable",
                passfile=os.devnull,  # never use the worker's ~/.pgpass
                connect_timeout=max(2, int(timeout)),
                application_name="iotplatform-delivery",
                autocommit=False,
            )
        except psycopg.OperationalError as exc:
            refused = _login_failure(str(exc))
            if refused is not None:
                log.info("postgres %s: login refused: %s", settings.context, exc)
                raise refused from None
            log.info("postgres %s: cannot connect to %s: %s", settings.context, address, exc)
            last = exc
            continue
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT set_config('statement_timeout', %s, false),"
                    " set_config('lock_timeout', %s, false),"
                    " set_config('idle_in_transaction_session_timeout', %s, false)",
                    (
                        f"{STATEMENT_TIMEOUT}s",
                        f"{LOCK_TIMEOUT}s",
                        f"{STATEMENT_TIMEOUT * 3}s",
                    ),
                )
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise classify(exc) from None
        return conn
    log.info("postgres %s: no address answered (%r)", settings.context, last)
    raise network_error()


def tls_in_use(conn: Connection) -> bool:
    return bool(conn.pgconn.ssl_in_use)


def ping(conn: Connection) -> None:
    conn.execute("SELECT 1")
    conn.rollback()


# --- errors -----------------------------------------------------------------------------------


def classify(exc: BaseException) -> SinkError:
    if isinstance(exc, SinkError):
        return exc
    if not isinstance(exc, psycopg.Error):
        if isinstance(exc, OSError):
            return network_error()
        return SinkError(ErrorClass.TRANSIENT, "Unexpected error while writing.")
    code = exc.sqlstate or ""
    text = (exc.diag.message_primary or str(exc)).strip()
    detail = (exc.diag.message_detail or "").strip()
    if code[:2] in _CONTENT_CLASSES:
        return SinkError(ErrorClass.CONTENT, f"{text} {detail}".strip())
    if code in _DESTINATION_CODES:
        return SinkError(ErrorClass.DESTINATION, f"{_DESTINATION_CODES[code]} ({text})")
    if code.startswith("28"):
        return SinkError(ErrorClass.DESTINATION, "The database refused the login.")
    if code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES:
        if code.startswith("08") or not code:
            return network_error()
        return SinkError(ErrorClass.TRANSIENT, text)
    if not code:  # the connection broke: psycopg raises OperationalError without a SQLSTATE
        return network_error()
    return SinkError(ErrorClass.TRANSIENT, text)


# --- the table --------------------------------------------------------------------------------


def table_info(conn: Connection, schema: str, table: str) -> TableInfo | None:
    """Columns and unique keys of schema.table, or None when it does not exist."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname,
                   NOT a.attnotnull,
                   a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '',
                   CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, NULL) END
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_type t ON t.oid = a.atttypid
            WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
              AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum
            """,
            (schema, table),
        )
        rows = cur.fetchall()
        if not rows:
            return None
        columns = {}
        for name, formatted, typname, nullable, has_default, domain_base in rows:
            base = domain_base or formatted
            family = FAMILIES.get(re.sub(r"\(.*\)", "", base).strip())
            if family is None:
                family = FAMILIES.get(typname, Family.OTHER)
            columns[name] = Column(name, formatted, family, nullable, has_default)
        cur.execute(
            """
            SELECT array_agg(a.attname ORDER BY a.attname)
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
            WHERE n.nspname = %s AND c.relname = %s AND i.indisunique
              AND i.indpred IS NULL AND i.indexprs IS NULL
            GROUP BY i.indexrelid
            """,
            (schema, table),
        )
        keys = tuple(frozenset(row[0]) for row in cur.fetchall())
    conn.rollback()
    return TableInfo(columns, keys)


def privilege_warnings(conn: Connection, schema: str, table: str) -> list[str]:
    """What this account may do beyond writing rows: owners should give it no more."""
    warnings = []
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb,
                   has_database_privilege(current_database(), 'CREATE'),
                   has_schema_privilege(%s, 'CREATE'),
                   EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = %s AND c.relname = %s
                             AND pg_has_role(c.relowner, 'USAGE'))
            FROM pg_roles r WHERE r.rolname = current_user
            """,
            (schema, schema, table),
        )
        row = cur.fetchone()
    conn.rollback()
    if row is None:
        return warnings
    superuser, createrole, createdb, db_create, schema_create, owns_table = row
    if superuser:
        warnings.append("the account is a superuser")
    rights = [
        label
        for flag, label in (
            (createrole, "CREATEROLE"),
            (createdb, "CREATEDB"),
            (db_create, "CREATE on the database"),
            (schema_create, f"CREATE on schema {schema}"),
            (owns_table, "owns the table (may ALTER or DROP it)"),
        )
        if flag
    ]
    if rights and not superuser:
        warnings.append("the account has DDL rights: " + ", ".join(rights))
    return warnings


# --- values -----------------------------------------------------------------------------------


def converter(column: Column) -> Any:
    """A function preparing a rendered value for this column (None: pass it as it is).

    PostgreSQL parses untyped text parameters into the column's type itself, so most values
    pass through; only what psycopg would send with a conflicting type is converted."""
    family = column.family
    if family is Family.JSON:
        wrap = Jsonb if column.data_type == "jsonb" else Json
        return lambda v: None if v is None else wrap(v)
    if family is Family.TEXT:
        return lambda v: v if v is None or isinstance(v, str) else _text(v)
    if family in (Family.INT, Family.FLOAT):
        return lambda v: int(v) if isinstance(v, bool) else _no_object(v)
    if family is Family.BOOL:
        return lambda v: _no_object(mapping.as_bool(v))
    if family is Family.TIME:
        return lambda v: _no_object(v)
    return lambda v: _text(v) if isinstance(v, dict | list) else v


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def _no_object(value: Any) -> Any:
    if isinstance(value, dict | list):
        raise ValueError("an object or list does not fit this column")
    return value


# --- writing ----------------------------------------------------------------------------------


def _name(target: Target) -> sql.Composed:
    return sql.Identifier(target.schema, target.table)


def _columns(names: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def upsert_sql(target: Target, rows: int, source: sql.Identifier | None = None) -> sql.Composed:
    """INSERT … ON CONFLICT of `rows` rows of parameters, or of everything in `source`."""
    if source is not None:
        values: sql.Composable = sql.SQL("SELECT {} FROM {}").format(
            _columns(target.columns), source
        )
    else:
        row = sql.SQL("({})").format(sql.SQL(", ").join([sql.Placeholder()] * len(target.columns)))
        values = sql.SQL("VALUES {}").format(sql.SQL(", ").join([row] * rows))
    statement = sql.SQL("INSERT INTO {} AS t ({}) {}").format(
        _name(target), _columns(target.columns), values
    )
    if not target.upsert:
        return statement
    updated = [c for c in target.columns if c not in target.key_columns]
    if not updated:
        return statement + sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(
            _columns(target.key_columns)
        )
    return statement + sql.SQL(
        " ON CONFLICT ({keys}) DO UPDATE SET ({cols}) = ROW({excluded})"
        # Compared as text: json (unlike jsonb) has no equality operator.
        " WHERE ROW({current})::text IS DISTINCT FROM ROW({excluded})::text"
    ).format(
        keys=_columns(target.key_columns),
        cols=_columns(updated),
        excluded=sql.SQL(", ").join(sql.Identifier("excluded", c) for c in updated),
        current=sql.SQL(", ").join(sql.Identifier("t", c) for c in updated),
    )


# Upserts go through a temporary staging table: COPY the batch into it, then one
# INSERT … SELECT … ON CONFLICT. A multi-row VALUES of 1,000 rows carries thousands of
# parameters, which psycopg and the server parse and plan on every call (~4× slower here).
STAGE = "iot_delivery_stage"
_staged: weakref.WeakKeyDictionary[Connection, bool] = weakref.WeakKeyDictionary()


def prepare(conn: Connection, target: Target) -> None:
    """Once per connection: the session's staging table for upserts (its columns typed as the
    mapped columns of the target, no constraints). Without TEMP rights, upserts use VALUES."""
    if not target.upsert:
        return
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "CREATE TEMPORARY TABLE {} ON COMMIT DELETE ROWS AS"
                    " SELECT {} FROM {} WITH NO DATA"
                ).format(sql.Identifier(STAGE), _columns(target.columns), _name(target))
            )
        _staged[conn] = True
    except psycopg.Error as exc:
        log.info("postgres: no staging table (%s); upserts use VALUES", exc)
        conn.rollback()
        _staged[conn] = False


def _copy(cur: Any, table: sql.Composable, columns: Sequence[str], rows: Any) -> None:
    with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, _columns(columns))) as copy:
        for row in rows:
            copy.write_row(row)


def write(conn: Connection, target: Target, rows: Sequence[Sequence[Any]]) -> None:
    """Write `rows` (values in `target.columns` order) in the caller's transaction."""
    if not rows:
        return
    with conn.cursor() as cur:
        if not target.upsert:
            _copy(cur, _name(target), target.columns, rows)
            return
        if _staged.get(conn):
            stage = sql.Identifier(STAGE)
            _copy(cur, stage, target.columns, rows)
            cur.execute(upsert_sql(target, 0, source=stage))
            # Emptied for the next part of a bisection (a commit empties it too).
            cur.execute(sql.SQL("DELETE FROM {}").format(stage))
            return
        per_statement = max(1, MAX_PARAMS // len(target.columns))
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            params = [value for row in chunk for value in row]
            cur.execute(upsert_sql(target, len(chunk)), params)


@contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    with conn.transaction():
        yield


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    # Nested transaction blocks are savepoints in psycopg 3: an error inside rolls back to it
    # and leaves the outer transaction usable.
    with conn.transaction():
        yield


def rollback_write(conn: Connection, target: Target, row: Sequence[Any]) -> None:
    """Write one row and roll it back (Test Connection)."""
    try:
        with conn.transaction(force_rollback=True):
            write(conn, target, [row])
    finally:
        conn.rollback()


def ddl(target: Target, types: Sequence[tuple[str, Family, int | None]]) -> str:
    lines = []
    if not target.upsert and "id" not in target.columns:
        lines.append('    "id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY')
    for name, family, length in types:
        kind = f"varchar({length})" if family is Family.TEXT and length else DDL_TYPES[family]
        null = " NOT NULL" if name in target.key_columns else ""
        lines.append(f"    {sql.Identifier(name).as_string(None)} {kind}{null}")
    if target.key_columns:
        lines.append(f"    PRIMARY KEY ({_columns(target.key_columns).as_string(None)})")
    body = ",\n".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {_name(target).as_string(None)} (\n{body}\n);"


def execute_ddl(conn: Connection, statement: str) -> None:
    # The statement is ours (built by `ddl` from validated, quoted identifiers), not the owner's.
    with conn.transaction():
        conn.execute(statement)  # type: ignore[arg-type]  # no parameters: taken as is
