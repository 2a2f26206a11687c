"""Plausible readings for the simulated power meters.

Not a power-systems model, just enough physics that the numbers hang together on a chart:
power = voltage × current, energy is the integral of power and only ever grows, and the values
stay in the ranges the standards allow (EN 50163 for 750 V DC traction, EN 50160 for 230/400 V).
Each model advances by the wall-clock time since its last reading, so readings look the same
whatever the reporting interval.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def _noise(rng: random.Random, sigma: float) -> float:
    """Zero-mean noise with standard deviation `sigma` (uniform: a third the cost of gauss)."""
    return (rng.random() - 0.5) * 3.4641 * sigma


def _approach(value: float, target: float, dt: float, tau: float) -> float:
    """First-order lag: move `value` toward `target` with time constant `tau` seconds."""
    return target + (value - target) * math.exp(-dt / tau)


@dataclass
class _Phase:
    name: str
    left: float  # seconds
    target: float  # amperes


class DcTractionFeeder:
    """A 750 V DC substation feeder: trains pass, draw up to ~3 kA accelerating, regenerate
    while braking (line voltage rises), and the feeder idles on auxiliary load in between."""

    NO_LOAD_V = 815.0  # rectifier output sits above the 750 V nominal
    SOURCE_OHMS = 0.025  # substation + line resistance seen by the feeder

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.current = rng.uniform(20, 80)
        self.phase = _Phase("idle", rng.expovariate(1 / 60), rng.uniform(20, 80))
        self.energy_kwh = round(rng.uniform(2e5, 3e6), 3)
        self.export_kwh = round(self.energy_kwh * rng.uniform(0.05, 0.15), 3)

    def _next_phase(self) -> _Phase:
        r = self.rng
        following = {"idle": "accel", "accel": "cruise", "cruise": "brake", "brake": "idle"}
        name = following[self.phase.name]
        if name == "accel":
            return _Phase(name, r.uniform(20, 40), r.uniform(1200, 2800))
        if name == "cruise":
            return _Phase(name, r.uniform(30, 90), r.uniform(200, 600))
        if name == "brake":
            # A receptive line takes the regenerated current back; sometimes nobody does.
            regen = -r.uniform(300, 1200) if r.random() < 0.8 else 0.0
            return _Phase(name, r.uniform(10, 25), regen)
        return _Phase(name, r.expovariate(1 / 90), r.uniform(20, 80))

    def step(self, dt: float) -> dict[str, float]:
        dt = max(0.0, dt)
        self.phase.left -= dt
        while self.phase.left <= 0:
            carry = self.phase.left
            self.phase = self._next_phase()
            self.phase.left += carry
        self.current = _approach(self.current, self.phase.target, dt, tau=3.0)
        current = self.current + _noise(self.rng, 8)
        voltage = self.NO_LOAD_V - self.SOURCE_OHMS * current + _noise(self.rng, 1.5)
        voltage = min(900.0, max(500.0, voltage))
        power_kw = voltage * current / 1000
        if power_kw >= 0:
            self.energy_kwh += power_kw * dt / 3600
        else:
            self.export_kwh += -power_kw * dt / 3600
        return {
            "voltage": round(voltage, 1),
            "current": round(current, 1),
            "power": round(power_kw, 2),
            "energy": round(self.energy_kwh, 3),
            "energy_export": round(self.export_kwh, 3),
        }


class AcMeter:
    """A 230/400 V 50 Hz supply meter, three-phase or single-phase, on a load that wanders."""

    def __init__(self, rng: random.Random, phases: int = 3) -> None:
        self.rng = rng
        self.phases = 3 if phases != 1 else 1
        base = rng.uniform(15, 120) if self.phases == 3 else rng.uniform(2, 30)
        self.currents = [base * rng.uniform(0.85, 1.15) for _ in range(self.phases)]
        self.base = base
        self.pf = rng.uniform(0.86, 0.97)
        self.frequency = 50.0
        self.energy_kwh = round(rng.uniform(1e4, 5e5), 3)

    def step(self, dt: float) -> dict[str, float]:
        dt, r = max(0.0, dt), self.rng
        # Grid frequency wanders within a few tens of mHz around 50 Hz.
        self.frequency = min(
            50.1, max(49.9, _approach(self.frequency, 50.0, dt, 60) + _noise(r, 0.005))
        )
        self.pf = min(0.99, max(0.75, self.pf + _noise(r, 0.003)))
        volts = [min(253.0, max(207.0, 230.0 + _noise(r, 1.8))) for _ in range(self.phases)]
        for i, amps in enumerate(self.currents):
            target = self.base * r.uniform(0.6, 1.4)
            self.currents[i] = max(0.0, _approach(amps, target, dt, tau=30.0) + _noise(r, 0.3))
        apparent_kva = sum(v * a for v, a in zip(volts, self.currents, strict=True)) / 1000
        power_kw = apparent_kva * self.pf
        reactive_kvar = math.sqrt(max(0.0, apparent_kva**2 - power_kw**2))
        self.energy_kwh += power_kw * dt / 3600
        data: dict[str, float] = {
            "voltage": round(sum(volts) / self.phases, 1),
            "current": round(sum(self.currents) / self.phases, 2),
            "power": round(power_kw, 3),
            "reactive_power": round(reactive_kvar, 3),
            "apparent_power": round(apparent_kva, 3),
            "power_factor": round(self.pf, 3),
            "frequency": round(self.frequency, 3),
            "energy": round(self.energy_kwh, 3),
            "phases": self.phases,
        }
        if self.phases == 3:
            for i in range(3):
                data[f"voltage_l{i + 1}"] = round(volts[i], 1)
                data[f"current_l{i + 1}"] = round(self.currents[i], 2)
            # Line-to-line voltage of a balanced system: √3 × phase voltage (≈ 400 V).
            data["voltage_ll"] = round(math.sqrt(3) * data["voltage"], 1)
        return data
