"""Connection safety against the real servers: MySQL LOCAL INFILE is off (the client does not even
announce it), a host that names a Unix socket or a host list never becomes a connection even if
it got past validation, and libpq takes nothing from the worker's own environment."""

from __future__ import annotations

import pymysql
import pytest
from pymysql.constants import CLIENT

from apps.forwarding.database import mysql, postgres
from apps.forwarding.database.base import ErrorClass, SinkError
from apps.forwarding.database.models import DatabaseDestination

pytestmark = [pytest.mark.services, pytest.mark.django_db]


def settings_for(db, **overrides) -> object:
    destination = DatabaseDestination(
        owner_id=1,
        engine=db.engine,
        host=db.host,
        port=db.port,
        database_name=db.database,
        schema="public" if db.engine == "postgres" else "",
        username=db.user,
        password="trusted" if db.engine == "postgres" else "",
        tls_mode="disable",
        table="t",
    )
    for name, value in overrides.items():
        setattr(destination, name, value)
    return destination.connection_settings()


def test_mysql_local_infile_is_off(mariadb_db, tmp_path) -> None:
    mariadb_db.execute("CREATE TABLE t (line text)")
    secret = tmp_path / "worker-file.txt"
    secret.write_text("a file on the worker\n")
    conn = mysql.connect(settings_for(mariadb_db))
    try:
        assert not conn.client_flag & CLIENT.LOCAL_FILES
        with pytest.raises(pymysql.MySQLError), conn.cursor() as cur:
            cur.execute(f"LOAD DATA LOCAL INFILE '{secret}' INTO TABLE t")
    finally:
        conn.close()
    assert mariadb_db.count("t") == 0


@pytest.mark.parametrize(
    "host", ["/var/run/postgresql", "/run/mysqld/mysqld.sock", "127.0.0.1,127.0.0.2", "@abstract"]
)
def test_a_socket_or_host_list_never_becomes_a_connection(target_db, host) -> None:
    """Validation refuses these hosts at save time; should one reach the writer anyway (a row
    written around the model), the egress guard's resolver refuses it before any connect."""
    engine = postgres if target_db.engine == "postgres" else mysql
    with pytest.raises(SinkError) as raised:
        engine.connect(settings_for(target_db, host=host))
    assert raised.value.kind is ErrorClass.NETWORK


def test_libpq_ignores_the_workers_own_password_file(postgres_db, tmp_path, monkeypatch) -> None:
    """A worker's ~/.pgpass (or PGPASSFILE) must never log an owner's destination in with the
    operator's credentials: the connection is opened with passfile=/dev/null."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:operator-secret\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    conn = postgres.connect(settings_for(postgres_db, password=""))  # libpq would look it up
    try:
        assert conn.info.password in ("", None)
    finally:
        conn.close()
