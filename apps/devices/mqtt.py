"""Broker connection settings shared by the listener, the command publisher and the simulator."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from django.conf import settings


def mqtt_params(url: str) -> dict:
    """host, port, username, password and tls of an mqtt:// or mqtts:// URL."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT_URL must be mqtt:// or mqtts://, got {parsed.scheme}://…")
    return {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or (8883 if parsed.scheme in ("mqtts", "ssl") else 1883),
        "username": unquote(parsed.username) if parsed.username else None,
        "password": unquote(parsed.password) if parsed.password else None,
        "tls": parsed.scheme in ("mqtts", "ssl"),
    }


def apply_login(client: mqtt.Client, params: dict) -> None:
    """The username/password and TLS of `mqtt_params` on a paho client (TLS verifies the
    broker's certificate against the system's CAs)."""
    if params["username"]:
        client.username_pw_set(params["username"], params["password"])
    if params["tls"]:
        client.tls_set()


def mqtt_protocol() -> int:
    return mqtt.MQTTv5 if str(settings.MQTT_PROTOCOL) == "5" else mqtt.MQTTv311


class BatchingClient(mqtt.Client):
    """A paho client that reads the socket in large chunks and hands messages over in lists.

    Stock paho (2.x) reads each packet with three or four small `recv()` calls after a
    `select()`, builds a `Properties` object and an `MQTTMessage` per PUBLISH, and its manual
    `ack()` queues one packet and wakes the network thread per message: at thousands of messages
    a second that was half of the listener's CPU. Here:

    * one `recv()` of up to READ_SIZE bytes per `loop_read`, from which paho's packet reader is
      fed (at most one read from the kernel per call, so the buffer is always empty when paho
      goes back to `select()`, and a connection that never pauses cannot starve the writes);
    * a plain PUBLISH (QoS 0 or 1, no properties) is decoded here into a tuple (topic, payload,
      qos, mid, retained); anything else takes paho's own path, whose `on_message` is routed
      to the same list, in order;
    * `on_messages(list)` is called once per `loop_read` with what it read;
    * `ack_many(mids)` queues all the PUBACKs as one write and one wake-up.

    It relies on internals of the pinned paho-mqtt 2.2.0 (`_sock_recv`, `_handle_publish`,
    `_packet_queue`); tests/devices/test_listener.py exercises every path against a real broker.
    """

    READ_SIZE = 256 * 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._refills = 1
        self._received: list[tuple[str, bytes, int, int, bool]] = []
        self.on_messages = None
        self.on_message = self._collect

    def _collect(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._received.append((msg.topic, msg.payload, msg.qos, msg.mid, bool(msg.retain)))

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            if self._refills <= 0:
                raise BlockingIOError  # paho keeps the partial packet; select() wakes it again
            self._refills -= 1
            buf = super()._sock_recv(self.READ_SIZE)
            if not buf:
                return buf  # connection closed
            pos = 0
        end = pos + bufsize
        self._rbuf, self._rpos = buf, end
        return buf[pos:end] if pos or end < len(buf) else buf

    def _sock_close(self) -> None:
        super()._sock_close()
        self._rbuf, self._rpos = b"", 0

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        self._refills = 1
        try:
            while True:
                rc = super().loop_read(max_packets)
                if rc or self._rpos >= len(self._rbuf):
                    return rc
        finally:
            if self._received:
                items, self._received = self._received, []
                if self.on_messages is not None:
                    self.on_messages(items)

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header = self._in_packet["command"]
        packet = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        n = int.from_bytes(packet[:2], "big")
        pos = 2 + n
        mid = 0
        if qos == 1:
            mid = int.from_bytes(packet[pos : pos + 2], "big")
            pos += 2
        if self._protocol == mqtt.MQTTv5:
            if pos >= len(packet) or packet[pos] != 0:  # properties: paho decodes them
                return super()._handle_publish()
            pos += 1
        if qos > 1 or n == 0 or pos > len(packet) or (qos and not self._manual_ack):
            return super()._handle_publish()
        try:
            topic = packet[2 : 2 + n].decode()
        except UnicodeDecodeError:
            return super()._handle_publish()
        payload = bytes(memoryview(packet)[pos:])  # paho's packet buffer is a bytearray
        self._received.append((topic, payload, qos, mid, bool(header & 0x01)))
        # QoS 1 with manual ack: nothing to send until ack_many().
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK these QoS 1 messages (manual ack): one packet write, one wake-up."""
        if not mids:
            return
        packet = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
        self._packet_queue(mqtt.PUBACK, packet, 0, 1)
