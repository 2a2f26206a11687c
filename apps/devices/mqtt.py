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
    * the plain PUBLISH packets (QoS 0 or 1, no properties) that lie whole in that buffer are
      decoded straight from it (`take_publishes`) into tuples (topic, payload, qos, mid,
      retained): paho's reader costs four `_sock_recv` calls and a dict of state per packet,
      ~10 us of the listener's ~110 per message at 8,000/s. The first packet of a read, one
      split across reads, and anything else take paho's own path, whose `on_message` is routed
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

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        if self._in_packet["command"] == 0 and self._rpos < len(self._rbuf):
            pos = take_publishes(
                self._rbuf,
                self._rpos,
                self._received,
                v5=self._protocol == mqtt.MQTTv5,
                qos1=self._manual_ack,
            )
            if pos != self._rpos:
                self._rpos = pos
                with self._msgtime_mutex:
                    self._last_bytes_received = mqtt.time_func()
                if pos >= len(self._rbuf):
                    return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN  # all read: back to select()
        return super()._packet_read()

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


PUBLISH = 0x30


def take_publishes(
    buf: bytes, pos: int, out: list[tuple[str, bytes, int, int, bool]], *, v5: bool, qos1: bool
) -> int:
    """Decode the plain PUBLISH packets lying whole in `buf` from `pos` on into `out`; return
    where decoding stopped: the end of the buffer, or the first packet left to paho (not a
    PUBLISH, QoS 2, QoS 1 unless acknowledged by hand, MQTT 5 properties, an empty or non-UTF-8
    topic, a malformed length, or a packet not whole in the buffer)."""
    end_buf = len(buf)
    while pos < end_buf:
        header = buf[pos]
        qos = (header >> 1) & 3
        if header & 0xF0 != PUBLISH or qos > 1 or (qos and not qos1):
            break
        # The remaining length: 1 to 4 bytes, 7 bits each, least significant first.
        i, length, shift = pos + 1, 0, 0
        while True:
            if i >= end_buf or shift > 21:
                return pos  # split across reads, or malformed: paho's reader decides
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        end = i + length
        if end > end_buf or length < 2:
            break
        n = (buf[i] << 8) | buf[i + 1]
        at = i + 2 + n
        mid = 0
        if qos:
            if at + 2 > end:
                break
            mid = (buf[at] << 8) | buf[at + 1]
            at += 2
        if v5:
            if at >= end or buf[at] != 0:  # properties: paho decodes them
                break
            at += 1
        if n == 0 or at > end:
            break
        try:
            topic = buf[i + 2 : i + 2 + n].decode()
        except UnicodeDecodeError:
            break
        out.append((topic, buf[at:end], qos, mid, bool(header & 0x01)))
        pos = end
    return pos
