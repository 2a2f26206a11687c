"""Reachability probes for the launcher and the embedded broker.

Deliberately free of Django imports: `scripts/wait_for.py` uses it before any settings exist.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    def field(value: str) -> bytes:
        raw = value.encode()
        return len(raw).to_bytes(2, "big") + raw

    flags = 0x02  # clean session
    payload = field(client_id)
    if username is not None:
        flags |= 0x80
        payload += field(username)
        if password is not None:
            flags |= 0x40
            payload += field(password)
    # Protocol "MQTT", level 4 (3.1.1), flags, keep-alive 10 s.
    body = field("MQTT") + bytes([4, flags]) + (10).to_bytes(2, "big") + payload
    length, encoded = len(body), b""
    while True:
        length, digit = divmod(length, 128)
        encoded += bytes([digit | (0x80 if length else 0)])
        if not length:
            break
    return b"\x10" + encoded + body


def mqtt_connack(url: str, timeout: float = 2.0) -> bool:
    """True when the broker at `url` (mqtt://[user:pass@]host:port) accepts an MQTT CONNECT.

    A bare TCP probe would make amqtt log an error for every attempt ("No data to decode"), and
    would not tell a broker from any other program on that port.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 1883
    client_id = f"probe-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_connect_packet(client_id, parsed.username, parsed.password))
            connack = sock.recv(4)
            if connack[:1] == b"\x20" and len(connack) == 4:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker does not log a lost client
            # Return code 0 = accepted; anything else (bad credentials…) is "not usable".
            return connack[:1] == b"\x20" and connack[3:4] == b"\x00"
    except OSError:
        return False


def wait_until(probe, timeout: float, interval: float = 0.2) -> bool:
    """Call `probe()` until it returns True or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
