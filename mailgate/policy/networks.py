"""CIDR lists (trusted networks, access-list IP rules) for IPv4 and IPv6 clients."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from mailgate.policy.base import Client, IPAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def unmap(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:192.0.2.1), else ``ip``.

    A dual-stack listener reports IPv4 clients in mapped form; they must match IPv4 rules.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_network(text: str) -> Network:
    """A network from "192.0.2.0/24", "2001:db8::/32" or a bare address (a /32 or /128).

    Host bits must be clear: "10.1.2.3/8" is an error rather than the match-nothing
    entry upas made of it.  An IPv4-mapped IPv6 network becomes the IPv4 network.
    Raises ValueError naming the problem.
    """
    network = ipaddress.ip_network(text.strip(), strict=True)
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


class NetworkList:
    """A set of networks that answers "is this client inside one of them"."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        # (network, mask) as integers: an address is inside when its own integer, masked,
        # is the network's, which is what ``ip in network`` computes, minus its checks
        self._v4 = [_bits(n) for n in networks if isinstance(n, ipaddress.IPv4Network)]
        self._v6 = [_bits(n) for n in networks if isinstance(n, ipaddress.IPv6Network)]

    @classmethod
    def parse(cls, entries: Iterable[str], key: str) -> NetworkList:
        """Parse CIDR strings; a bad entry raises ValueError("<key>: <entry>: <problem>")."""
        networks = []
        for entry in entries:
            try:
                networks.append(parse_network(entry))
            except ValueError as exc:
                raise ValueError(f"{key}: {entry!r}: {exc}") from None
        return cls(networks)

    def __contains__(self, ip: IPAddress) -> bool:
        ip = unmap(ip)
        candidates = self._v4 if isinstance(ip, ipaddress.IPv4Address) else self._v6
        if not candidates:
            return False
        value = int(ip)
        for network, mask in candidates:  # noqa: SIM110 - any() would build a generator
            if value & mask == network:
                return True
        return False


def _bits(network: Network) -> tuple[int, int]:
    return int(network.network_address), int(network.netmask)


def is_trusted(client: Client) -> bool:
    """Trusted network or authenticated: may relay, skips sender checks (upas 2008+)."""
    return client.trusted or client.auth_user is not None
