"""Test Connection for database destinations, and the table checks the writer shares with it.

The test connects as the pipeline would (egress guard, short timeout), then checks, naming every
column concerned: the table exists; every mapped column exists; each mapped value (rendered from
a sample event — the owner's latest reading when there is one) fits its column's type; required
columns are mapped; upsert keys match a primary key or unique index. If all that holds, it writes
the rendered row inside a transaction and rolls it back, so the server's own constraints have
their say without leaving a row behind. Warnings: TLS off, a superuser or an account with DDL
rights (a delivery account needs INSERT, and UPDATE for upsert — nothing more).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from ..kinds import TestResult
from . import mapping, mysql, postgres
from .base import CONNECT_TIMEOUT, Column, ErrorClass, Report, SinkError, TableInfo, Target

if TYPE_CHECKING:
    from .models import DatabaseDestination

log = logging.getLogger(__name__)


def column_key(engine: str, name: str) -> str:
    # MySQL column names are case-insensitive; PostgreSQL's quoted names are exact.
    return name.lower() if engine == "mysql" else name


def columns_by_name(engine: str, table: TableInfo) -> dict[str, Column]:
    return {column_key(engine, c.name): c for c in table.columns.values()}


def missing_columns(engine: str, target: Target, table: TableInfo) -> list[str]:
    found = columns_by_name(engine, table)
    return [c for c in target.columns if column_key(engine, c) not in found]


def key_problem(engine: str, target: Target, table: TableInfo) -> str | None:
    if not target.upsert:
        return None
    wanted = frozenset(column_key(engine, k) for k in target.key_columns)
    keys = {frozenset(column_key(engine, c) for c in key) for key in table.unique_keys}
    if wanted in keys:
        return None
    return (
        f"Upsert needs a primary key or unique index on exactly ({', '.join(target.key_columns)})"
        f" in {target.table}."
    )


def mapping_problem(engine: str, target: Target, table: TableInfo) -> str | None:
    """Why rows of this mapping cannot be written to this table at all (the writer's check)."""
    missing = missing_columns(engine, target, table)
    if missing:
        return f"Mapped columns missing from {target.table}: {', '.join(missing)}."
    return key_problem(engine, target, table)


def _engine(name: str) -> Any:
    return postgres if name == "postgres" else mysql


def check_table(
    destination: DatabaseDestination, table: TableInfo, sample: dict[str, Any], report: Report
) -> list[Any] | None:
    """Fill `report` with the table's problems; return the converted sample row when it may be
    test-written."""
    engine_name = destination.engine
    target = destination.target()
    columns = columns_by_name(engine_name, table)
    missing = missing_columns(engine_name, target, table)
    if missing:
        report.errors.append(f"Missing columns in {target.table}: {', '.join(missing)}.")
    renderer = mapping.Renderer(destination.column_mapping)
    values = renderer.render(sample)
    mismatches = []
    for (name, expression), value in zip(destination.column_mapping, values, strict=True):
        column = columns.get(column_key(engine_name, name))
        if column is None:
            continue
        why = mapping.mismatch(value, mapping.single_path(expression), column.family)
        if why:
            mismatches.append(f"{name} is {column.data_type} but {expression} gives {why}")
    if mismatches:
        report.errors.append("Type mismatches: " + "; ".join(mismatches) + ".")
    mapped = {column_key(engine_name, c) for c in target.columns}
    required = [
        c.name
        for c in table.columns.values()
        if c.required and column_key(engine_name, c.name) not in mapped
    ]
    if required:
        report.errors.append(
            "Required columns (NOT NULL, no default) are not mapped: " + ", ".join(required) + "."
        )
    problem = key_problem(engine_name, target, table)
    if problem:
        report.errors.append(problem)
    if report.errors:
        return None
    engine = _engine(engine_name)
    try:
        return [
            engine.converter(columns[column_key(engine_name, name)])(value)
            for name, value in zip(target.columns, values, strict=True)
        ]
    except (ValueError, TypeError, OverflowError) as exc:
        report.errors.append(f"The sample row cannot be converted: {exc}.")
        return None


def run(destination: DatabaseDestination) -> TestResult:
    """Test Connection: returns the result and stores the full report on the destination."""
    from .models import DatabaseDestination

    report = Report()
    t0 = time.perf_counter()
    engine = _engine(destination.engine)
    settings = destination.connection_settings()
    target = destination.target()
    if settings.tls_mode == "disable":
        report.warnings.append("TLS is off: rows and the password cross the network unencrypted")
    try:
        conn = engine.connect(settings, timeout=CONNECT_TIMEOUT)
    except SinkError as exc:
        report.errors.append(exc.message)
        conn = None
    if conn is not None:
        try:
            _checks(destination, engine, conn, target, report)
        except Exception as exc:
            error = engine.classify(exc)
            log.info("test of destination %s: %r", destination.pk, exc)
            report.errors.append(error.message)
        finally:
            with contextlib.suppress(Exception):  # already broken
                conn.close()
    duration_ms = int((time.perf_counter() - t0) * 1000)
    DatabaseDestination.objects.filter(pk=destination.pk).update(
        test_report={**report.as_json(), "at": timezone.now().isoformat(), "ms": duration_ms}
    )
    return TestResult(report.ok, report.summary(), None, duration_ms)


def _checks(
    destination: DatabaseDestination, engine: Any, conn: Any, target: Target, report: Report
) -> None:
    table = engine.table_info(conn, target.schema, target.table)
    if table is None:
        report.errors.append(
            f"The table {target.schema}.{target.table} does not exist (the form suggests a "
            "CREATE TABLE)."
        )
    else:
        sample = dict(mapping.sample_event(destination.owner_id))
        sample["id"] = "test_" + secrets.token_hex(8)  # never collides with a real event
        row = check_table(destination, table, sample, report)
        if row is not None:
            if not table.transactional:
                report.warnings.append(
                    f"{target.table} is not transactional (engine without rollback): the test "
                    "row was not written, and a failed batch could leave part of its rows"
                )
            else:
                try:
                    engine.rollback_write(conn, target, row)
                except Exception as exc:
                    error = engine.classify(exc)
                    if error.kind is ErrorClass.NETWORK:
                        raise
                    report.errors.append(f"The test row was refused: {error.message}")
                else:
                    report.notes.append(
                        f"Connected; {target.table} fits the mapping; a test row was written "
                        "and rolled back."
                    )
    report.warnings.extend(engine.privilege_warnings(conn, target.schema, target.table))
    if destination.tls_mode != "disable" and not engine.tls_in_use(conn):
        report.warnings.append("the connection is not encrypted")
