"""A DNS server that does not answer, at the guard's seam (`egress._getaddrinfo`): the one part
of delivery the tests cannot run for real.

A name from `hang()` blocks (as getaddrinfo does while glibc waits for a silent server) until
`release()` or HANG seconds, then fails as glibc would; a name from `slow(delay)` answers
127.0.0.1 after `delay`; every other name resolves for real. Calls are counted per name, so
tests can tell how many lookups were started. Each name is new, so a lookup another test left
running is never joined."""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from typing import Any

HANG = 30.0  # far longer than any deadline under test: a bound that works ends well before


class SilentDNS:
    def __init__(self) -> None:
        self.delays: dict[str, float] = {}  # name -> seconds (HANG: no answer at all)
        self.released = threading.Event()
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def hang(self) -> str:
        name = f"hangs-{uuid.uuid4().hex[:12]}.example"
        self.delays[name] = HANG
        return name

    def slow(self, delay: float) -> str:
        name = f"slow-{uuid.uuid4().hex[:12]}.example"
        self.delays[name] = delay
        return name

    def __call__(self, host: str, port: int | None) -> list[tuple[Any, ...]]:
        with self.lock:
            self.calls[host] += 1
        delay = self.delays.get(host)
        if delay is None:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        self.released.wait(delay)
        if delay >= HANG:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port or 0))]

    def release(self) -> None:
        """End every lookup still blocked: the guard's DNS threads are free again."""
        self.released.set()
