"""The simulator's engine: connections, the report schedule, commands, shutdown, the summary.

One thread runs everything (see `connection.Reactor`). Each device normally has its own MQTT
connection — its own client id, login and will, as in the field. `shared_connection=True` puts
every device on one connection for high-rate benchmarks: one socket is far cheaper, but then
there are no per-device wills (a graceful stop still publishes each device's offline state).

Rates: with `rate=None` each device reports every `device.interval` seconds (its expected
interval); with `rate=R > 0` the intervals are set so that all devices together publish about
R periodic messages per second; with `rate=0` reports go out as fast as the connections take
them (a burst), bounded by `max_pending` unacknowledged messages per connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt

from apps.devices.models import Profile

from .base import DeviceOptions, DeviceSpec, Message, SimDevice
from .connection import Broker, Reactor, make_client
from .esp32_lamp import Esp32Lamp
from .faults import FaultInjector
from .meter_v2 import MeterV2
from .tasmota import Tasmota

log = logging.getLogger("iotplatform.simulator")

DEVICE_CLASSES: dict[str, type[SimDevice]] = {
    Profile.ESP32_LAMP: Esp32Lamp,
    Profile.TASMOTA: Tasmota,
    Profile.METER_V2: MeterV2,
}
BURST_BATCH = 200  # reports per turn of the loop in burst mode
BACKOFF_MAX = 30.0
HANDSHAKE_TIMEOUT = 10.0
BURST_WAIT = 30.0  # seconds a burst waits for every device to be connected


@dataclass
class RunOptions:
    broker: Broker
    shared_connection: bool = False
    protocol: int = mqtt.MQTTv311
    ca_file: str | None = None
    keepalive: int = 30
    max_inflight: int = 100
    max_pending: int = 1000  # unacknowledged publishes per connection before reports wait
    rate: float | None = None
    duration: float | None = None
    messages: int | None = None  # stop after this many periodic messages
    abrupt: bool = False  # stop without DISCONNECT, so the broker publishes the wills
    drain_timeout: float = 10.0
    # MQTT handshakes (CONNECT .. last SUBACK) in flight at once. 1 by default: amqtt 0.12
    # drops a connecting client when another one subscribes meanwhile ("dictionary changed
    # size during iteration" in broker.py); Mosquitto takes any number.
    connect_concurrency: int = 1


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    by_profile: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    periodic: int = 0
    acknowledged: int = 0  # QoS 0: written to the socket; QoS 1: PUBACK received
    dropped: int = 0  # a report or reply while its connection was down
    commands: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    connect_failures: int = 0
    reboots: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    @property
    def sent(self) -> int:
        return sum(self.by_profile.values())

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.elapsed, 3),
            "sent": self.sent,
            "rate": round(self.sent / self.elapsed, 1) if self.elapsed else 0.0,
            "periodic": self.periodic,
            "acknowledged": self.acknowledged,
            "dropped": self.dropped,
            "by_profile": dict(self.by_profile),
            "by_kind": dict(self.by_kind),
            "commands": dict(self.commands),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "reboots": self.reboots,
            "faults": dict(self.faults),
        }

    def summary_line(self) -> str:
        profiles = ", ".join(f"{p} {n}" for p, n in sorted(self.by_profile.items())) or "none"
        commands = sum(self.commands.values())
        faults = ", ".join(f"{n} {k}" for k, n in sorted(self.faults.items()) if n) or "none"
        return (
            f"simulate_devices: {self.sent} messages in {self.elapsed:.1f}s "
            f"({self.sent / max(self.elapsed, 1e-9):.1f}/s; {profiles}); "
            f"acknowledged {self.acknowledged}, dropped {self.dropped}; "
            f"commands answered {commands}; reboots {self.reboots}; "
            f"connects {self.connects} (failed {self.connect_failures}); faults: {faults}"
        )


@dataclass(eq=False)
class Conn:
    """One paho client: a link has a new one after every reconnect or reboot."""

    link: Link
    client: mqtt.Client
    sent: int = 0
    done: int = 0
    connected: bool = False
    subacks: int = 0  # SUBSCRIBEs still unanswered

    @property
    def pending(self) -> int:
        return self.sent - self.done


@dataclass(eq=False)
class Link:
    """A logical MQTT connection: one device's own, or the shared one."""

    name: str
    devices: list[SimDevice]
    conn: Conn | None = None
    backoff: float = 0.5
    exact: dict[str, SimDevice] = field(default_factory=dict)
    prefixed: dict[str, SimDevice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for device in self.devices:
            for sub in device.subscriptions():
                if sub.endswith(("/#", "/+")):
                    self.prefixed[sub[:-2]] = device
                else:
                    self.exact[sub] = device

    @property
    def up(self) -> bool:
        return self.conn is not None and self.conn.connected

    def route(self, topic: str) -> SimDevice | None:
        """The device subscribed to `topic`. Checked even on a device's own connection:
        amqtt 0.12 hands a connecting client the retained messages matching *any* client's
        subscriptions (broker.py, after CONNACK), so foreign topics do arrive."""
        return self.exact.get(topic) or self.prefixed.get(topic.rsplit("/", 1)[0])


class Simulator:
    """Builds the devices from their specs and drives them until stopped."""

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        options: RunOptions,
        device_options: DeviceOptions | None = None,
        faults: FaultInjector | None = None,
        seed: int | None = None,
    ) -> None:
        if not specs:
            raise ValueError("nothing to simulate: no devices")
        self.options = options
        self.faults = faults or FaultInjector()
        self.rng = random.Random(seed)
        device_options = device_options or DeviceOptions()
        self.devices: list[SimDevice] = []
        for spec in specs:
            rng = random.Random(f"{seed}/{spec.device_id}") if seed is not None else random.Random()
            cls = DEVICE_CLASSES[spec.profile]
            self.devices.append(cls(spec, self, device_options, rng))
        if options.shared_connection:
            self.links = [Link(f"sim-shared-{self.rng.getrandbits(32):08x}", self.devices)]
        else:
            self.links = [Link(d.client_id, [d]) for d in self.devices]
        self.link_of = {d: link for link in self.links for d in link.devices}
        if options.rate:
            # Weighted by messages per report, so a plug's STATE + SENSOR counts twice.
            for d in self.devices:
                d.interval = d.reports_per_tick * len(self.devices) / options.rate
        self.stats = Stats()
        self.reactor = Reactor()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._stop = threading.Event()
        self._force = threading.Event()
        self._abrupt = options.abrupt
        self.stage = "new"  # -> running -> draining [-> goodbye -> closing] -> done
        self._burst_next = 0
        self._connect_queue: deque[Link] = deque()
        self._handshaking: set[Conn] = set()

    # --- Host API (for devices) -------------------------------------------------------------
    def publish(self, device: SimDevice, message: Message) -> None:
        conn = self.link_of[device].conn
        if conn is None or not conn.connected:
            self.stats.dropped += 1
            return
        info = conn.client.publish(message.topic, message.payload, message.qos, message.retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.stats.dropped += 1
            return
        conn.sent += 1
        self.stats.by_profile[device.profile] += 1
        self.stats.by_kind[message.kind] += 1

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), callback))

    def reboot(self, device: SimDevice) -> None:
        if self.stage != "running":
            return
        self.stats.reboots += 1
        link = self.link_of[device]
        log.info("%s: rebooting", device.device_id)
        if len(link.devices) > 1:
            # A shared connection cannot die for one device: boot it and say hello again.
            device.boot()
            if link.up:
                for message in device.online():
                    self.publish(device, message)
            return
        self._kill(link)  # no DISCONNECT: the broker publishes the will, as on a power cut
        device.boot()
        self.call_later(0.2, lambda: self._request_connect(link))

    # --- control ----------------------------------------------------------------------------
    def request_stop(self, *, abrupt: bool | None = None, force: bool = False) -> None:
        """Thread- and signal-safe. `force` skips waiting for unacknowledged messages."""
        if abrupt is not None:
            self._abrupt = abrupt
        if force:
            self._force.set()
        self._stop.set()

    def run(self) -> Stats:
        self.stage = "running"
        self.stats = Stats()
        now = time.monotonic()
        self._connect_queue.extend(self.links)
        self._at(now, self._pump_connects)
        if self.options.rate == 0:
            self._at(now, self._burst)
        else:
            for d in self.devices:
                first = now + self.rng.uniform(0, min(d.interval, 10.0))
                self._at(first, lambda d=d, first=first: self._tick(d, first))
        if self.options.duration:
            self._at(now + self.options.duration, self.request_stop)
        try:
            self._loop()
        finally:
            self.stats.finished = time.monotonic()
            self.stats.faults = Counter(self.faults.counts)
            self.reactor.close()
        return self.stats

    # --- the loop ---------------------------------------------------------------------------
    def _at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._order), callback))

    def _loop(self) -> None:
        last_misc = 0.0
        deadline = 0.0
        while self.stage != "done":
            now = time.monotonic()
            if self._stop.is_set() and self.stage == "running":
                self.stage, deadline = "draining", now + self.options.drain_timeout
            waiting = self.stage in ("draining", "goodbye")
            if waiting and (self._force.is_set() or now > deadline or self._drained()):
                # Everything sent so far is acknowledged (or we gave up waiting).
                if self.stage == "goodbye":
                    self._disconnect_all()
                    self.stage, deadline = "closing", now + 3.0
                elif self._abrupt:
                    self._kill_all()
                    break
                else:
                    self._say_goodbye()
                    self.stage, deadline = "goodbye", now + 3.0
            elif self.stage == "closing" and (self._closed() or now > deadline):
                self._kill_all()
                break
            for _ in range(1000):  # run due timers, but keep polling the sockets in between
                if not self._timers or self._timers[0][0] > now:
                    break
                _, _, callback = heapq.heappop(self._timers)
                try:
                    callback()
                except Exception:
                    log.exception("simulator timer failed")
            timeout = 0.05 if self.stage != "running" else 0.1
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - time.monotonic())
            self.reactor.poll(timeout)
            if now - last_misc >= 0.5:
                last_misc = now
                for link in self.links:
                    if link.conn is not None:
                        link.conn.client.loop_misc()  # keepalive pings

    def _drained(self) -> bool:
        return all(
            link.conn.pending <= 0 and not link.conn.client.want_write()
            for link in self.links
            if link.up and link.conn is not None
        )

    def _closed(self) -> bool:
        return all(link.conn is None or link.conn.client.socket() is None for link in self.links)

    # --- connections ------------------------------------------------------------------------
    def _request_connect(self, link: Link) -> None:
        self._connect_queue.append(link)
        self._pump_connects()

    def _pump_connects(self) -> None:
        while self._connect_queue and len(self._handshaking) < self.options.connect_concurrency:
            self._connect(self._connect_queue.popleft())

    def _handshake_over(self, conn: Conn) -> None:
        if conn in self._handshaking:
            self._handshaking.discard(conn)
            self._pump_connects()

    def _handshake_timeout(self, conn: Conn) -> None:
        if conn not in self._handshaking:
            return
        link = conn.link
        if link.conn is conn:
            self._kill(link)
            self._retry(link, f"no answer from the broker within {HANDSHAKE_TIMEOUT:g}s")
        self._handshake_over(conn)

    def _connect(self, link: Link) -> None:
        if self.stage != "running":
            return
        first = link.devices[0]
        shared = len(link.devices) > 1
        credential = first.spec if not shared else None
        o = self.options
        client = make_client(
            link.name,
            o.broker,
            will=None if shared else first.will(),
            username=credential.username if credential else "",
            password=credential.password if credential else "",
            protocol=o.protocol,
            ca_file=o.ca_file,
            max_inflight=o.max_inflight,
        )
        conn = Conn(link, client)
        client.user_data_set(conn)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.reactor.attach(client)
        link.conn = conn
        self._handshaking.add(conn)
        self.call_later(HANDSHAKE_TIMEOUT, lambda: self._handshake_timeout(conn))
        try:
            if o.protocol == mqtt.MQTTv5:
                client.connect(o.broker.host, o.broker.port, o.keepalive, clean_start=True)
            else:
                client.connect(o.broker.host, o.broker.port, o.keepalive)
        except (OSError, ValueError) as exc:
            link.conn = None
            self._handshaking.discard(conn)  # the caller's pump goes on with the next link
            self._retry(link, f"cannot connect to {o.broker}: {exc}")

    def _retry(self, link: Link, why: str) -> None:
        self.stats.connect_failures += 1
        # The first failure of a fleet is news; a thousand identical ones are noise.
        level = logging.WARNING if self.stats.connect_failures == 1 else logging.DEBUG
        log.log(level, "%s: %s; retrying in %.1fs", link.name, why, link.backoff)
        delay = link.backoff * self.rng.uniform(0.8, 1.2)
        link.backoff = min(BACKOFF_MAX, link.backoff * 2)
        self.call_later(delay, lambda: self._request_connect(link))

    def _kill(self, link: Link) -> None:
        """Drop the connection without DISCONNECT, leaving paho out of it."""
        conn, link.conn = link.conn, None
        if conn is None:
            return
        conn.connected = False
        self._handshake_over(conn)
        sock = conn.client.socket()
        if sock is None:
            return
        self.reactor.forget(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _kill_all(self) -> None:
        for link in self.links:
            self._kill(link)
        self.stage = "done"

    def _say_goodbye(self) -> None:
        """A clean DISCONNECT suppresses the will, so each device first publishes its offline
        state itself (as Tasmota does on restart); else the retained state would read
        "online" until the platform's inactivity timeout."""
        for link in self.links:
            if not link.up:
                self._kill(link)
                continue
            for device in link.devices:
                self.publish(device, replace(device.offline(), kind="goodbye"))

    def _disconnect_all(self) -> None:
        for link in self.links:
            if link.conn is not None:
                link.conn.connected = False
                link.conn.client.disconnect()

    # --- paho callbacks (VERSION2) ----------------------------------------------------------
    def _on_connect(
        self, client: mqtt.Client, conn: Conn, flags: Any, reason: Any, props: Any
    ) -> None:
        link = conn.link
        if link.conn is not conn:
            return
        if reason.is_failure:
            self._kill(link)
            self._retry(link, f"broker refused the connection: {reason}")
            return
        conn.connected = True
        link.backoff = 0.5
        self.stats.connects += 1
        filters = [(f, 1) for d in link.devices for f in d.subscriptions()]
        for i in range(0, len(filters), 100):
            client.subscribe(filters[i : i + 100])
            conn.subacks += 1
        if not conn.subacks:
            self._handshake_over(conn)
        for device in link.devices:
            for message in device.online():
                self.publish(device, message)

    def _on_disconnect(
        self, client: mqtt.Client, conn: Conn, flags: Any, reason: Any, props: Any
    ) -> None:
        link = conn.link
        conn.connected = False
        self._handshake_over(conn)
        if link.conn is not conn or self.stage != "running":
            return
        link.conn = None
        self._retry(link, f"connection lost ({reason})")

    def _on_subscribe(
        self, client: mqtt.Client, conn: Conn, mid: int, reasons: Any, props: Any
    ) -> None:
        conn.subacks -= 1
        if conn.subacks <= 0:
            self._handshake_over(conn)

    def _on_message(self, client: mqtt.Client, conn: Conn, message: mqtt.MQTTMessage) -> None:
        device = conn.link.route(message.topic)
        if device is None:
            log.debug("ignoring %s: no simulated device subscribed to it", message.topic)
            return
        self.stats.commands[device.profile] += 1
        try:
            device.handle(message.topic, message.payload)
        except Exception:
            log.exception("%s: failed to handle %s", device.device_id, message.topic)

    def _on_publish(
        self, client: mqtt.Client, conn: Conn, mid: int, reason: Any, props: Any
    ) -> None:
        conn.done += 1
        self.stats.acknowledged += 1

    # --- reports ----------------------------------------------------------------------------
    def _can_report(self, device: SimDevice) -> bool:
        conn = self.link_of[device].conn
        return conn is not None and conn.connected and conn.pending < self.options.max_pending

    def _emit_report(self, device: SimDevice) -> None:
        messages = self.faults.report(device)
        limit = self.options.messages
        if limit is not None:
            messages = messages[: max(0, limit - self.stats.periodic)]
        for message in messages:
            self.publish(device, message)
        self.stats.periodic += len(messages)
        if limit is not None and self.stats.periodic >= limit:
            self.request_stop()

    def _tick(self, device: SimDevice, due: float) -> None:
        if self.stage != "running" or self._stop.is_set():
            return
        now = time.monotonic()
        link = self.link_of[device]
        if link.up and not self._can_report(device):
            # Back-pressure: the broker is behind. Wait a moment, keep the schedule.
            self._at(now + 0.005, lambda: self._tick(device, due))
            return
        if link.up:
            self._emit_report(device)
        nxt = due + device.interval
        if nxt < now - max(1.0, device.interval):
            nxt = now + device.interval  # far behind (e.g. the loop was stalled): don't burst
        self._at(nxt, lambda: self._tick(device, nxt))

    def _burst(self) -> None:
        """Rate 0: report round-robin as fast as back-pressure allows."""
        if self.stage != "running" or self._stop.is_set():
            return
        now = time.monotonic()
        if now - self.stats.started < BURST_WAIT and not all(link.up for link in self.links):
            # Start together: else the first devices to connect would send the whole burst.
            self._at(now + 0.02, self._burst)
            return
        sent = misses = 0
        n = len(self.devices)
        # A batch per turn of the loop, so the sockets get polled in between.
        while sent < BURST_BATCH and misses < n:
            device = self.devices[self._burst_next]
            self._burst_next = (self._burst_next + 1) % n
            if not self._can_report(device):
                misses += 1
                continue
            misses = 0
            sent += 1
            self._emit_report(device)
            if self._stop.is_set():
                return
        self._at(time.monotonic() + (0 if sent else 0.005), self._burst)
