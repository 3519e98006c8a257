"""The PROXY v1/v2 header parser: valid headers, every kind of malformed one, fuzzing."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.server.proxy import V1_MAX, V2_SIGNATURE, ProxyError, ProxyHeader, parse_proxy


def v2(command: int, family: int, transport: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family << 4 | transport])
        + struct.pack("!H", size)
        + body
    )


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + tlvs
    return v2(1, 1, 1, body)


def v2_inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )
    return v2(1, 2, 1, body)


SMTP = b"EHLO client.example\r\n"
FAMILY = "PROXY v1 family must be TCP4, TCP6 or UNKNOWN"
FIELDS = "PROXY v1 line needs: PROXY TCP4|TCP6 src dst sport dport"
PORT = "PROXY v1 port is not a number from 0 to 65535"
ASCII = "PROXY v1 line has characters outside printable ASCII"
NOT_IP = "PROXY v1 address is not an IP address"


# --- v1 ----------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    assert parse_proxy(line + SMTP) == ProxyHeader(
        "192.0.2.1", 56324, "198.51.100.2", 25, consumed=len(line), local=False
    )


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 587\r\n"
    assert parse_proxy(line) == ProxyHeader(
        "2001:db8::1", 65535, "2001:db8::2", 587, len(line), False
    )


def test_v1_unknown_means_use_the_real_peer() -> None:
    line = b"PROXY UNKNOWN ff:ff::1 whatever\r\n"
    assert parse_proxy(line + SMTP) == ProxyHeader("", 0, "", 0, len(line), local=True)
    assert parse_proxy(b"PROXY UNKNOWN\r\n") == ProxyHeader("", 0, "", 0, 15, local=True)


def test_v1_of_the_longest_allowed_length() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(line) == V1_MAX
    header = parse_proxy(line)
    assert header is not None and header.consumed == V1_MAX


@pytest.mark.parametrize(
    "partial",
    [b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 25", b"PROXY TCP4\r"],
)
def test_v1_needs_more(partial: bytes) -> None:
    assert parse_proxy(partial) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"EHLO x\r\n", "no PROXY protocol signature"),
        (b"PROXy TCP4", "no PROXY protocol signature"),
        (b"PROXY UNKNOWN " + b"x" * 100, "PROXY v1 line longer than 107 bytes"),
        (b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n", "PROXY v1 line longer than 107 bytes"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 25\n", "PROXY v1 line must end with CRLF"),
        (b"PROXY TCP5 192.0.2.1 198.51.100.2 1 25\r\n", FAMILY),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", FIELDS),
        (b"PROXY TCP4  192.0.2.1 198.51.100.2 1 25\r\n", FIELDS),
        (b"PROXY TCP4 192.0.2.300 198.51.100.2 1 25\r\n", NOT_IP),
        (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n", "PROXY v1 address is not IPv4"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::1 1 25\r\n", "PROXY v1 address is not IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 1 25\r\n", NOT_IP),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n", PORT),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n", PORT),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 +25 25\r\n", PORT),
        (b"PROXY TCP4 192.0.2.1 198.51.100.2 \xd9\xa1 25\r\n", ASCII),
        (b"PROXY TCP4 192.0.2.1\r198.51.100.2 1 25\r\n", ASCII),
    ],
)  # fmt: skip
def test_v1_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyError) as info:
        parse_proxy(data)
    assert str(info.value) == message


# --- v2 ----------------------------------------------------------------------------------


def test_v2_inet() -> None:
    header = v2_inet("192.0.2.1", "198.51.100.2", 40000, 25)
    assert parse_proxy(header + SMTP) == ProxyHeader(
        "192.0.2.1", 40000, "198.51.100.2", 25, consumed=28, local=False
    )


def test_v2_inet6() -> None:
    header = v2_inet6("2001:db8::1", "2001:db8::2", 1, 465)
    assert parse_proxy(header + SMTP) == ProxyHeader(
        "2001:db8::1", 1, "2001:db8::2", 465, 52, False
    )


def test_v2_tlvs_are_skipped() -> None:
    tlvs = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP with three bytes
    header = v2_inet("192.0.2.1", "198.51.100.2", 1, 25, tlvs)
    result = parse_proxy(header + SMTP)
    assert result is not None and result.consumed == len(header) and result.source_ip == "192.0.2.1"


@pytest.mark.parametrize(
    "header",
    [
        v2(0, 0, 0, b""),  # LOCAL, as a health check sends it
        v2(0, 1, 1, b"\x00" * 12),  # LOCAL with an address block: ignored
        v2(1, 0, 0, b""),  # PROXY over UNSPEC
        v2(1, 3, 1, b"\x00" * 216),  # PROXY over AF_UNIX: no IP to give
    ],
)
def test_v2_local_means_use_the_real_peer(header: bytes) -> None:
    assert parse_proxy(header + SMTP) == ProxyHeader("", 0, "", 0, len(header), local=True)


@pytest.mark.parametrize("cut", range(len(V2_SIGNATURE) + 4 + 12))
def test_v2_needs_more(cut: int) -> None:
    assert parse_proxy(v2_inet("192.0.2.1", "198.51.100.2", 1, 25)[:cut]) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            V2_SIGNATURE + b"\x10\x11\x00\x0c" + b"\x00" * 12,
            "PROXY v2 header has an unknown version",
        ),
        (
            V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,
            "PROXY v2 header has an unknown command",
        ),
        (v2(1, 4, 1, b"\x00" * 12), "PROXY v2 header has an unknown address family or transport"),
        (v2(1, 1, 3, b"\x00" * 12), "PROXY v2 header has an unknown address family or transport"),
        (v2(1, 1, 2, b"\x00" * 12), "PROXY v2 header is not for a stream (TCP) connection"),
        (v2(1, 1, 1, b"\x00" * 11), "PROXY v2 header is too short for its addresses"),
        (v2(1, 2, 1, b"\x00" * 12), "PROXY v2 header is too short for its addresses"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "no PROXY protocol signature"),
    ],
)
def test_v2_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyError) as info:
        parse_proxy(data)
    assert str(info.value) == message


def test_v2_truncated_body_waits_then_a_full_one_parses() -> None:
    full = v2_inet("192.0.2.1", "198.51.100.2", 1, 25)
    assert parse_proxy(full[:-1]) is None
    assert parse_proxy(full) is not None


# --- fuzzing -----------------------------------------------------------------------------

VALID = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 587\r\n",
    b"PROXY UNKNOWN\r\n",
    v2_inet("192.0.2.1", "198.51.100.2", 40000, 25),
    v2_inet6("2001:db8::1", "2001:db8::2", 1, 465),
    v2(0, 0, 0, b""),
]


def parse_or_error(data: bytes) -> ProxyHeader | str | None:
    try:
        return parse_proxy(data)
    except ProxyError as exc:
        return f"error: {exc}"


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_proxy_error(data: bytes) -> None:
    parse_or_error(data)


@given(st.sampled_from(VALID), st.binary(max_size=40), st.integers(0, 16), st.binary(max_size=8))
def test_mutated_headers_raise_only_proxy_error(
    header: bytes, tail: bytes, position: int, junk: bytes
) -> None:
    mutated = header[:position] + junk + header[position + len(junk) :]
    parse_or_error(mutated + tail)


@given(st.sampled_from(VALID), st.binary(max_size=40), st.data())
def test_any_split_gives_the_same_result(header: bytes, tail: bytes, data: st.DataObject) -> None:
    """Fed as it arrives, in any pieces: None until the header is whole, then the same."""
    stream = header + tail
    whole = parse_proxy(stream)
    assert whole is not None and whole.consumed == len(header)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    for cut in cuts:
        got = parse_proxy(stream[:cut])
        assert got == (whole if cut >= len(header) else None)


@given(st.binary(max_size=200), st.integers(0, 200))
def test_a_prefix_never_contradicts_the_whole(data: bytes, cut: int) -> None:
    """If a prefix already gives a header or an error, more bytes cannot change it."""
    early = parse_or_error(data[:cut])
    if early is not None:
        assert parse_or_error(data) == early
