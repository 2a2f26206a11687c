"""A real HTTP receiver on loopback for delivery tests: scripted answers, every request kept.

Threaded `http.server` speaking HTTP/1.1 keep-alive, so the platform's connection pooling is
exercised for real. Per path, a script of answers (status, headers, body, a delay before
answering, or a body trickled byte by byte); the last answer repeats.

Signatures are verified here with the Standard Webhooks rules written out independently of
`apps.forwarding.webhook.signing`, so that a bug there cannot hide itself.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"ok":true}'
    delay: float = 0.0  # seconds before answering (a hanging receiver: large)
    drip: float = 0.0  # seconds between body bytes (a slow-drip receiver)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.time() when the request was read

    def signatures(self) -> list[str]:
        return self.headers.get("webhook-signature", "").split()


def expected_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_by(request: Received, secret: str) -> bool:
    want = expected_signature(
        secret, request.headers["webhook-id"], request.headers["webhook-timestamp"], request.body
    )
    return any(hmac.compare_digest(want, sig) for sig in request.signatures())


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up (timeouts, killed workers) are part of the tests, not errors.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Receiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[Received] = []
        self.scripts: dict[str, list[Answer]] = defaultdict(list)
        self.served: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                answer = receiver._record(
                    Received(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        time.time(),
                    )
                )
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if answer.drip:
                    for i in range(len(answer.body)):
                        self.wfile.write(answer.body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(answer.drip)
                else:
                    self.wfile.write(answer.body)

            def _safe(self) -> None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._handle()

            do_POST = do_PUT = do_GET = _safe

        self.server = _QuietServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, path: str, *answers: Answer) -> None:
        with self.lock:
            self.scripts[path] = list(answers)
            self.served[path] = 0

    def _record(self, request: Received) -> Answer:
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.requests.append(request)
            script = self.scripts.get(path) or [Answer()]
            index = min(self.served[path], len(script) - 1)
            self.served[path] += 1
            return script[index]

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
