"""Fixtures of tests/devices. Broker-credential tests: a private Mosquitto with dynamic security."""

from tests.devices.broker_kit import broker_settings, committed, dynsec_broker, peers, spy

__all__ = ["broker_settings", "committed", "dynsec_broker", "peers", "spy"]
