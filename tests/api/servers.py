"""Real web processes for API tests: daphne subprocesses on the test database.

Limits and idempotency must hold across processes, so these tests talk HTTP to two separate
daphne processes rather than to the in-process test client. Use with `transactional_db`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen

    def call(
        self, method: str, path: str, token: str, body: Any = None, headers: dict | None = None
    ) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)  # noqa: S310
        request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                return Answer(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), error.read())


@contextmanager
def web_servers(count: int, log_dir: Path, **env: str) -> Iterator[list[Server]]:
    """`count` daphne processes with these extra settings (environment variables)."""
    servers: list[Server] = []
    try:
        for n in range(count):
            port = free_port()
            log = (log_dir / f"daphne-{n}.log").open("wb")
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "iotplatform.asgi:application",
                ],
                cwd=ROOT,
                env=subprocess_env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            servers.append(Server(f"http://127.0.0.1:{port}", proc))
        for server in servers:
            _wait_until_up(server, log_dir)
        yield servers
    finally:
        for server in servers:
            server.proc.terminate()
        for server in servers:
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()


def _wait_until_up(server: Server, log_dir: Path, timeout: float = 60) -> None:
    host, port = server.url.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            logs = "\n".join(p.read_text(errors="replace") for p in log_dir.glob("daphne-*.log"))
            raise RuntimeError(f"daphne exited:\n{logs[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("daphne did not start")
