"""Cursors for the few hot statements that bypass Django's (PostgreSQL only).

Django's cursors bind on the client: psycopg then quotes every value into the query text in
Python. The ingest and delivery paths send their batches as arrays bound on the server in
binary instead (`%b` placeholders), which PostgreSQL parses once per statement text.

Python integers are sent as `bigint` here, whatever their size. psycopg's default picks the
smallest type that fits (`smallint[]` for a list of small ids), and the server then pays for it:

- `bigint_column = ANY(smallint[])` compares with the cross-type `int82eq`, which cannot be
  hashed, so a sequential scan tests every row against every element (seen: 5% of the whole
  machine's CPU in bench-dbsink, loading a batch's devices);
- `%b::bigint[]` on a `smallint[]` converts each element at planning time (`array_map`).

Errors come out as Django's (`django.db.IntegrityError`, `OperationalError`…), as from Django's
own cursors: the listener tells a bad batch from a lost database by them, and Django then knows
to replace a broken connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg


@contextmanager
def binary_cursor(connection, *, binary_results: bool = False) -> Iterator[psycopg.Cursor]:
    """A server-binding psycopg cursor on Django's `connection` (opened if needed), with
    integers dumped as `int8`, closed at the end of the block. `binary_results`: rows come back
    in binary too (C loaders for every type; JSON then arrives as bytes)."""
    import psycopg
    from psycopg.types.numeric import Int8BinaryDumper

    with connection.wrap_database_errors:
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.adapters.register_dumper(int, Int8BinaryDumper)
            if binary_results:
                cursor.format = psycopg.pq.Format.BINARY
            yield cursor
