"""A fast webhook receiver for the benchmark: asyncio, HTTP/1.1 keep-alive, verifies every
Standard Webhooks signature, remembers each webhook-id and when it arrived.

    python bench/webhooks/receiver.py PORT SECRET

Control endpoints (GET): /__stats (JSON figures since the last reset), /__reset.
Latency is arrival minus the event's own timestamp (the publisher's clock, same machine):
publish -> received. Runs as its own process so that it does not share a GIL with anything.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import sys
import time
from datetime import datetime

import orjson

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class State:
    def __init__(self, secret: str) -> None:
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.reset()

    def reset(self) -> None:
        self.seen: dict[str, int] = {}
        self.requests = 0
        self.bad = 0
        self.first = self.last = 0.0
        self.latencies: list[float] = []

    def record(self, headers: dict[bytes, bytes], body: bytes) -> None:
        now = time.time()
        self.requests += 1
        if not self.first:
            self.first = now
        self.last = now
        msg_id = headers.get(b"webhook-id", b"").decode()
        signed = msg_id.encode() + b"." + headers.get(b"webhook-timestamp", b"") + b"." + body
        want = b"v1," + base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest())
        if not any(
            hmac.compare_digest(want, s) for s in headers.get(b"webhook-signature", b"").split()
        ):
            self.bad += 1
        self.seen[msg_id] = self.seen.get(msg_id, 0) + 1
        try:
            ts = orjson.loads(body).get("timestamp")
            if ts:
                self.latencies.append(now - datetime.fromisoformat(ts).timestamp())
        except (ValueError, AttributeError):
            pass

    def stats(self) -> bytes:
        return orjson.dumps(
            {
                "requests": self.requests,
                "unique": len(self.seen),
                "duplicates": sum(n - 1 for n in self.seen.values() if n > 1),
                "bad_signatures": self.bad,
                "first": self.first,
                "last": self.last,
                "latencies": self.latencies,
            }
        )


class Protocol(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].split(b"\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                break
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            path = head[0].split(b" ")[1]
            if path == b"/__stats":
                payload = self.state.stats()
                out.append(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
                )
            elif path == b"/__reset":
                self.state.reset()
                out.append(OK)
            else:
                self.state.record(headers, body)
                out.append(OK)
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


async def serve(port: int, secret: str) -> None:
    state = State(secret)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Protocol(state), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
