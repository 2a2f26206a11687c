"""Readiness checks behind `/readyz`: database, channel layer, Celery broker.

Each check is a real round trip to its dependency, run concurrently with a short timeout, so a
hung dependency turns into a 503 within `READINESS_TIMEOUT` instead of a hung probe. Checks that
block (database, Celery broker) run on a thread of their own, not on the thread that serves
Django's sync views, so a stuck database cannot take the rest of the site down with the probe;
and at most one of each is in flight, so a probe every few seconds against a hung server cannot
pile up threads.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connections

READINESS_TIMEOUT = 2.0  # seconds, per check; Kubernetes' default probe timeout is 1 s per try


@dataclass
class CheckResult:
    name: str
    ok: bool
    ms: float
    error: str = ""

    def as_dict(self) -> dict:
        result: dict = {"ok": self.ok, "ms": round(self.ms, 1)}
        if self.error:
            result["error"] = self.error
        return result


def _check_database() -> None:
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        # This runs in a throwaway thread: never leave its connection behind (PostgreSQL would
        # keep it open, and pytest-django could not drop its test database).
        connections["default"].close()


async def _check_channel_layer() -> None:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    # A send to a group nobody joins: Redis gets a PUBLISH, the SQLite layer a query of its
    # group table — the same path every live update takes.
    await layer.group_send("health.readyz", {"type": "health.check"})


def _check_celery_broker() -> None:
    from kombu import Connection

    # Built from settings (what the Celery app reads at start) so that the check follows them.
    url = settings.CELERY_BROKER_URL
    if url.startswith("filesystem://"):
        # Broker-less transport: "reachable" means its folders exist and are writable.
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
        for key in ("data_folder_in", "data_folder_out", "processed_folder"):
            folder = Path(options[key])
            if not (folder.is_dir() and os.access(folder, os.W_OK)):
                raise RuntimeError(f"Celery folder {folder} is missing or not writable")
        return
    with Connection(
        url,
        connect_timeout=READINESS_TIMEOUT,
        # socket_timeout too: a server that accepts but never answers would hold the thread.
        transport_options={
            "socket_connect_timeout": READINESS_TIMEOUT,
            "socket_timeout": READINESS_TIMEOUT,
        },
    ) as conn:
        conn.ensure_connection(max_retries=0)


class BlockingCheck:
    """Runs a blocking check on its own thread, refusing to start a second one meanwhile."""

    def __init__(self, func: Callable[[], None]) -> None:
        self.func = func
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"readyz{func.__name__}")
        self.pending: Future | None = None

    async def __call__(self) -> None:
        if self.pending is not None and not self.pending.done():
            raise RuntimeError("the previous check has not returned yet")
        self.pending = self.executor.submit(self.func)
        await asyncio.wrap_future(self.pending)


CHECKS: dict[str, Callable[[], Awaitable[None]]] = {
    "database": BlockingCheck(_check_database),
    "channel_layer": _check_channel_layer,
    "celery_broker": BlockingCheck(_check_celery_broker),
}


async def _run(name: str, check: Callable[[], Awaitable[None]], timeout: float) -> CheckResult:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        error = f"timed out after {timeout:g} s"
    except Exception as exc:
        # Type and message only: enough for an operator, no traceback or settings in the body.
        error = f"{type(exc).__name__}: {exc}"[:300]
    else:
        error = ""
    return CheckResult(name, not error, (time.perf_counter() - started) * 1000, error)


async def run_checks(timeout: float | None = None) -> list[CheckResult]:
    timeout = READINESS_TIMEOUT if timeout is None else timeout
    return list(
        await asyncio.gather(*(_run(name, check, timeout) for name, check in CHECKS.items()))
    )
