"""Fault injection for testing the listener: duplicates, sequence gaps, malformed payloads.

Applied to periodic reports only (lifecycle messages and command replies stay clean, so a
test can still count on the handshake). Each kind of malformed payload is one the listener
must quarantine rather than crash on.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

from .base import Message, SimDevice

BAD_PAYLOADS: tuple[tuple[str, bytes], ...] = (
    ("truncated", b'{"v":2,"seq":1,"msg_type":"telemetry","data":{"voltage":75'),
    ("not_utf8", b"\xff\xfe\x00\x9c garbage \xc3\x28"),
    ("nan", b'{"deviceId":"x","power":"ON","v":2,"seq":1,"data":{"voltage":NaN}}'),
    ("wrong_types", b'{"v":"two","seq":"first","msg_type":42,"data":[1,2,3],"power":true}'),
    ("not_an_object", b'["ON","OFF"]'),
    ("empty", b""),
    # One byte over the 64 KiB the platform accepts.
    ("oversize", b'{"pad":"' + b"x" * (64 * 1024 - 9) + b'"}'),
)


@dataclass
class FaultInjector:
    duplicate_rate: float = 0.0
    gap_rate: float = 0.0
    bad_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for name in ("duplicate_rate", "gap_rate", "bad_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")

    @property
    def active(self) -> bool:
        return bool(self.duplicate_rate or self.gap_rate or self.bad_rate)

    def report(self, device: SimDevice) -> list[Message]:
        """The device's next periodic report, with faults mixed in."""
        if not self.active:
            return device.report()
        rng = self.rng
        if (
            self.gap_rate
            and rng.random() < self.gap_rate
            and device.skip_sequence(rng.randint(1, 3))
        ):
            self.counts["gaps"] += 1
        out: list[Message] = []
        for message in device.report():
            if self.bad_rate and rng.random() < self.bad_rate:
                kind, payload = rng.choice(BAD_PAYLOADS)
                message = replace(message, payload=payload, kind=f"bad_{kind}")
                self.counts["bad"] += 1
            out.append(message)
            if self.duplicate_rate and rng.random() < self.duplicate_rate:
                out.append(message)  # the very same bytes: same seq, same ts
                self.counts["duplicates"] += 1
        return out
