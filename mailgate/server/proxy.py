"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-I/O.

A load balancer in ``server.proxy_from`` puts this header before the SMTP stream to
tell the real client's address.  :func:`parse_proxy` is fed the bytes received so far
and says "need more" (None), "here is the header and how many bytes it took", or
raises :class:`ProxyError`; the caller owns the socket, the timeout and the trust.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (proxy-protocol.txt 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature, version/command, family/transport, length

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_ADDRESS_BYTES = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header; the connection should be closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header said.  ``local``: use the real peer (v2 LOCAL, v1 UNKNOWN...)."""

    source_ip: str
    source_port: int
    dest_ip: str
    dest_port: int
    consumed: int  # bytes of the buffer the header took; the SMTP stream starts after
    local: bool


def parse_proxy(buf: bytes) -> ProxyHeader | None:
    """Parse a PROXY v1 or v2 header at the start of ``buf``; None: need more bytes."""
    if buf.startswith(V2_SIGNATURE):
        return _parse_v2(buf)
    if buf.startswith(V1_PREFIX):
        return _parse_v1(buf)
    if V2_SIGNATURE.startswith(buf[: len(V2_SIGNATURE)]) or V1_PREFIX.startswith(buf[:6]):
        return None  # still a prefix of one of the two signatures
    raise ProxyError("no PROXY protocol signature")


def _local(consumed: int) -> ProxyHeader:
    return ProxyHeader("", 0, "", 0, consumed, local=True)


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if b"\n" in buf[:V1_MAX]:
            raise ProxyError("PROXY v1 line must end with CRLF")
        if len(buf) >= V1_MAX:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    line = buf[:end]
    if not line.isascii() or b"\r" in line or b"\x00" in line:
        raise ProxyError("PROXY v1 line has characters outside printable ASCII")
    parts = line.decode("ascii").split(" ")
    if parts[1] == "UNKNOWN":
        return _local(end + 2)  # the rest of the line is to be ignored
    if len(parts) != 6:
        raise ProxyError("PROXY v1 line needs: PROXY TCP4|TCP6 src dst sport dport")
    _, family, src, dst, sport, dport = parts
    version = {"TCP4": 4, "TCP6": 6}.get(family)
    if version is None:
        raise ProxyError("PROXY v1 family must be TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(
        _v1_ip(src, version), _v1_port(sport), _v1_ip(dst, version), _v1_port(dport),
        end + 2, local=False,
    )  # fmt: skip


def _v1_ip(text: str, version: int) -> str:
    try:
        if "%" in text:  # an IPv6 scope is meaningless across the balancer
            raise ValueError(text)
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError("PROXY v1 address is not an IP address") from None
    if ip.version != version:
        raise ProxyError(f"PROXY v1 address is not IPv{version}")
    return str(ip)


def _v1_port(text: str) -> int:
    # decimal, no sign, no leading zero (proxy-protocol.txt 2.1)
    digits = text.isascii() and text.isdigit() and len(text) <= 5
    if not digits or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyError("PROXY v1 port is not a number from 0 to 65535")
    return int(text)


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    if len(buf) < V2_HEADER:
        return None
    version_command, family_transport, length = struct.unpack_from("!BBH", buf, 12)
    if version_command >> 4 != 2:
        raise ProxyError("PROXY v2 header has an unknown version")
    command = version_command & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyError("PROXY v2 header has an unknown command")
    family, transport = family_transport >> 4, family_transport & 0xF
    if family > _AF_UNIX or transport > 0x2:
        raise ProxyError("PROXY v2 header has an unknown address family or transport")
    consumed = V2_HEADER + length
    if len(buf) < consumed:
        return None
    if command == _V2_LOCAL or family in (_AF_UNSPEC, _AF_UNIX):
        # LOCAL: a health check from the balancer itself; UNSPEC/UNIX: no IP address
        # to give.  Either way the real peer stands (proxy-protocol.txt 2.2).
        return _local(consumed)
    if transport != _STREAM:
        raise ProxyError("PROXY v2 header is not for a stream (TCP) connection")
    if length < _ADDRESS_BYTES[family]:
        raise ProxyError("PROXY v2 header is too short for its addresses")
    body = buf[V2_HEADER:consumed]
    if family == _AF_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        ip: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    else:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        ip = ipaddress.IPv6Address
    return ProxyHeader(str(ip(src)), sport, str(ip(dst)), dport, consumed, local=False)
