"""`take_publishes`: the listener's decoder of whole PUBLISH packets in a read buffer.

Packets are built here byte by byte from the MQTT specifications (3.1.1 §3.3, 5.0 §3.3); the
decoder must take exactly the plain ones that lie whole in the buffer and stop, without
consuming anything, at the first packet it leaves to paho. tests/devices/test_listener.py runs
it against a real broker.
"""

from __future__ import annotations

import pytest

from apps.devices.mqtt import take_publishes


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: str | bytes,
    payload: bytes,
    qos: int = 0,
    mid: int = 0,
    retain: bool = False,
    *,
    v5: bool = False,
    properties: bytes = b"",
) -> bytes:
    name = topic.encode() if isinstance(topic, str) else topic
    body = len(name).to_bytes(2, "big") + name
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        body += varint(len(properties)) + properties
    body += payload
    return bytes([0x30 | qos << 1 | retain]) + varint(len(body)) + body


def take(buf: bytes, pos: int = 0, *, v5: bool = False, qos1: bool = True):
    out: list = []
    return take_publishes(buf, pos, out, v5=v5, qos1=qos1), out


@pytest.mark.parametrize("v5", [False, True], ids=["mqtt311", "mqtt5"])
def test_every_whole_plain_publish_is_decoded_in_order(v5):
    # Payload sizes around the 1-, 2- and 3-byte remaining lengths (127 | 128, 16383 | 16384).
    sizes = [0, 1, 100, 120, 121, 122, 16_370, 16_380, 20_000, 200_000]
    packets, expected = [], []
    for i, size in enumerate(sizes):
        topic, payload = f"iot/m-{i}/telemetry", bytes([i]) * size
        qos, mid, retain = i % 2, (i * 7919) % 65535 + 1, i % 3 == 0
        packets.append(publish(topic, payload, qos, mid if qos else 0, retain, v5=v5))
        expected.append((topic, payload, qos, mid if qos else 0, retain))
    buf = b"".join(packets)

    pos, out = take(buf, v5=v5)

    assert pos == len(buf)
    assert out == expected
    assert all(type(payload) is bytes for _, payload, *_ in out)


def test_a_packet_cut_by_the_end_of_the_buffer_is_left_whole_for_paho():
    packets = [publish("a/b", b"x" * 200, 1, 5), publish("a/c", b"y" * 3), publish("d", b"")]
    stream = b"".join(packets)
    ends = [sum(map(len, packets[: k + 1])) for k in range(len(packets))]
    for cut in range(len(stream) + 1):
        pos, out = take(stream[:cut])
        whole = [end for end in ends if end <= cut]
        assert pos == (whole[-1] if whole else 0), cut
        assert len(out) == len(whole), cut


def test_decoding_starts_at_the_given_position():
    first, second = publish("a", b"1"), publish("b", b"2", 1, 9)
    pos, out = take(first + second, len(first))
    assert pos == len(first + second)
    assert out == [("b", b"2", 1, 9, False)]


@pytest.mark.parametrize(
    ("packet", "v5", "qos1"),
    [
        (b"\xd0\x00", False, True),  # PINGRESP
        (b"\x40\x02\x00\x07", False, True),  # PUBACK
        (publish("a", b"p", 2, 3), False, True),  # QoS 2: paho runs the handshake
        (publish("a", b"p", 1, 3), False, False),  # QoS 1 that paho acknowledges itself
        (publish("a", b"p", v5=True, properties=b"\x23\x00\x01"), True, True),  # topic alias
        (publish("", b"p", v5=True), True, True),  # empty topic
        (publish(b"\xff\xfe", b"p"), False, True),  # not UTF-8
        (b"\x30\xff\xff\xff\xff\x01", False, True),  # a remaining length of five bytes
        (b"\x30\x01\x00", False, True),  # shorter than its topic length
        (b"\x32\x03\x00\x01a", False, True),  # QoS 1 without room for its packet id
    ],
    ids=[
        "pingresp",
        "puback",
        "qos2",
        "qos1-auto-ack",
        "v5-properties",
        "empty-topic",
        "bad-utf8",
        "long-varint",
        "short",
        "no-packet-id",
    ],
)
def test_decoding_stops_at_what_paho_must_handle_and_takes_only_what_came_before(packet, v5, qos1):
    qos = 1 if qos1 else 0
    before = publish("ok/1", b"one", v5=v5) + publish("ok/2", b"two", qos, 2 * qos, v5=v5)
    after = publish("ok/3", b"three", v5=v5)

    pos, out = take(before + packet + after, v5=v5, qos1=qos1)

    assert pos == len(before)
    assert [topic for topic, *_ in out] == ["ok/1", "ok/2"]
