"""Simulated devices for all three profiles of SPEC §4 (`manage.py simulate_devices`).

One module per profile (`esp32_lamp`, `tasmota`, `meter_v2`) speaks that profile's contract from
the device side; `runner.Simulator` connects them to a broker and drives them. See
`docs/protocols.md` for the contracts themselves.
"""

from .base import DeviceOptions, DeviceSpec, Message, SimDevice
from .connection import Broker
from .faults import FaultInjector
from .runner import RunOptions, Simulator, Stats
from .specs import owner_specs, synthetic_specs

__all__ = [
    "Broker",
    "DeviceOptions",
    "DeviceSpec",
    "FaultInjector",
    "Message",
    "RunOptions",
    "SimDevice",
    "Simulator",
    "Stats",
    "owner_specs",
    "synthetic_specs",
]
