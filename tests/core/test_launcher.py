"""`make run`'s launcher (scripts/run.py) and the broker wait (scripts/wait_for.py).

The full start (pip, honcho, every process) is checked by hand in a clean clone, see
docs/configuration.md; these cover the refusals, which must happen before anything is touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# Service switches a CI run exports; the launcher tests run the embedded shape without them.
SERVICE_VARIABLES = (
    "DATABASE_URL",
    "MQTT_URL",
    "MQTT_PROTOCOL",
    "CELERY_BROKER_URL",
    "CHANNEL_LAYER_URL",
    "CACHE_URL",
    "EMBEDDED",
    "EMBEDDED_BROKER",
    "PORT",
)


def run_script(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def launcher_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A private VAR_DIR and no external services: the embedded shape, as on a fresh machine.
    return {"VAR_DIR": str(tmp_path / "var"), **extra}


def test_run_refuses_a_busy_web_port_before_touching_the_database(tmp_path, busy_port) -> None:
    result = run_script("run.py", env=launcher_env(tmp_path, PORT=str(busy_port)))
    assert result.returncode == 1
    assert f"port {busy_port} is in use" in result.stderr
    assert not (tmp_path / "var" / "db.sqlite3").exists()  # no migrate, no seed


def test_run_refuses_to_start_a_broker_where_one_already_listens(tmp_path, busy_port) -> None:
    env = launcher_env(tmp_path, MQTT_URL=f"mqtt://127.0.0.1:{busy_port}", PORT="0")
    result = run_script("run.py", env=env)
    assert result.returncode == 1
    assert f"already listens on 127.0.0.1:{busy_port}" in result.stderr
    assert "EMBEDDED_BROKER=false" in result.stderr


def test_wait_for_gives_up_without_printing_credentials(busy_port) -> None:
    # Something listens but never answers CONNECT: not a broker.
    started = time.monotonic()
    result = run_script(
        "wait_for.py",
        "mqtt",
        f"mqtt://platform:s3cret@127.0.0.1:{busy_port}",
        "--timeout",
        "1",
        env={},
    )
    assert result.returncode == 1
    assert f"no MQTT broker at 127.0.0.1:{busy_port}" in result.stderr
    assert "s3cret" not in result.stderr
    assert time.monotonic() - started < 30
