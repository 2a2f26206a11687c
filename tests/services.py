"""Which real services this run may use, and skips with a clear reason when one is absent.

`make test` on a bare machine runs on embedded parts and skips service-backed tests;
`.ci/run` switches every service on and fails if anything was skipped.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest


def _reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _require(env_name: str, default_url: str, what: str) -> str:
    url = os.environ.get(env_name, "")
    if not url:
        pytest.skip(f"{what}: set {env_name} (e.g. {default_url}) to run this test")
    parsed = urlparse(url)
    if not _reachable(parsed.hostname or "127.0.0.1", parsed.port or 0):
        pytest.skip(f"{what} at {url} is not reachable")
    return url


def require_postgres() -> str:
    """URL of a PostgreSQL server usable as an owner's delivery target (admin rights)."""
    return _require("TEST_POSTGRES_URL", "postgres://root@127.0.0.1:5432/postgres", "PostgreSQL")


def require_mariadb() -> str:
    return _require("TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test", "MariaDB")


def require_mosquitto() -> str:
    return _require("TEST_MOSQUITTO_URL", "mqtt://127.0.0.1:1883", "Mosquitto")


def require_redis() -> str:
    return _require("TEST_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis")
