"""Browser tests: Debian Chromium driven by Playwright against a real daphne (ASGI, WebSockets).

pytest-django's `live_server` is WSGI only, so the platform's own processes are started as
subprocesses on the test databases (`server_settings`). Tests use `transactional_db` so that
what they write is committed and visible to those processes.

These tests run whenever Chromium and Playwright are present; they skip otherwise, unless
RUN_BROWSER_TESTS=1 (CI), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.db import connections

from tests.conftest import free_port, subprocess_env
from tests.devices.live_helpers import isolated_layer_config, shared_cache_config

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
T = TypeVar("T")


def _missing_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (Debian package 'chromium')"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the 'playwright' Python package is not installed"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    missing = _missing_browser()
    if missing:
        if os.environ.get("RUN_BROWSER_TESTS") == "1":
            pytest.fail(f"RUN_BROWSER_TESTS=1 but {missing}")
        pytest.skip(missing)
    return CHROMIUM


def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ORM code while Playwright's sync API holds an event loop in this thread.

    Django refuses synchronous queries from a thread with a running loop; a worker thread
    (own connection, autocommit) does them instead.
    """

    def call() -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result(timeout=60)


class PlatformProcess:
    """One platform process (daphne, the listener) on the test databases; restartable."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=out)

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean close of the sockets it holds."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Server(PlatformProcess):
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port)]
        super().__init__("daphne", [*argv, "iotplatform.asgi:application"], env, log)

    def start(self, timeout: float = 60) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"daphne exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"daphne did not answer within {timeout}s:\n{self.tail()}")


@pytest.fixture
def platform_env(transactional_db, settings, mqtt_broker, tmp_path) -> dict[str, str]:
    """Environment of a platform process sharing this test's databases, channel layer, cache
    and MQTT broker (the embedded one, or Mosquitto in CI).

    The cache is shared as in production: pages mark the groups they watch in it, and the
    listener's publisher sends only to those (apps.devices.live)."""
    layer = isolated_layer_config()
    settings.CHANNEL_LAYERS = layer
    cache_dir = tmp_path / "shared-cache"
    settings.CACHES = shared_cache_config(cache_dir)
    names = {alias: connections[alias].settings_dict["NAME"] for alias in settings.DATABASES}
    extra = {
        "DJANGO_SETTINGS_MODULE": "tests.browser.server_settings",
        "IOT_TEST_DATABASE_NAMES": json.dumps({k: str(v) for k, v in names.items()}),
        "PYTHONUNBUFFERED": "1",
        "MQTT_URL": mqtt_broker.url,
        "MQTT_PROTOCOL": mqtt_broker.protocol,
        "MQTT_SHARED_GROUP": "",
        "CACHE_URL": f"filecache://{cache_dir}",
    }
    prefix = layer["default"].get("CONFIG", {}).get("prefix")
    if prefix:
        extra["CHANNEL_LAYER_PREFIX"] = prefix
    return subprocess_env(**extra)


@pytest.fixture
def server(chromium, platform_env, tmp_path) -> Iterator[Server]:
    server = Server(platform_env, tmp_path / "daphne.log")
    server.start()
    yield server
    server.stop()
    print(f"--- daphne log ---\n{server.tail()}")


@pytest.fixture
def browser_page(chromium) -> Iterator[Any]:
    """A fresh Chromium page. Playwright's loop lives only inside this fixture's scope."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.set_default_timeout(15_000)
        # Uncaught exceptions in the page's scripts fail the test (console noise such as a
        # refused WebSocket during a server restart does not).
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        context.close()
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def login(page: Any, base_url: str, username: str, password: str) -> None:
    """Log in through the admin login form, as a person would, and land on the dashboard."""
    page.goto(f"{base_url}/admin/login/?next=/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.press("input[name=password]", "Enter")
    assert page.url == f"{base_url}/", f"login failed, still on {page.url}"
