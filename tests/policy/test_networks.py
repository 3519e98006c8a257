"""NetworkList answers exactly as ipaddress's own ``ip in network`` would."""

from __future__ import annotations

import ipaddress
import random

import pytest

from mailgate.policy.networks import NetworkList, parse_network, unmap

NETWORKS = [
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "192.168.1.0/24",
    "2001:db8::/32",
    "::ffff:192.0.2.0/120",
    "0.0.0.0/0",
    "198.51.100.7",
]


def addresses(rng: random.Random) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    chosen: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.IPv4Address(text)
        for text in ("127.0.0.1", "10.255.255.255", "11.0.0.0", "192.168.1.5", "192.0.2.9")
    ]
    chosen += [
        ipaddress.IPv6Address(text)
        for text in ("::1", "::2", "::ffff:127.0.0.1", "::ffff:192.0.2.200", "2001:db8::5")
    ]
    chosen += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(50)]
    chosen += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(50)]
    return chosen


@pytest.mark.parametrize("seed", range(20))
def test_membership_is_that_of_ipaddress(seed: int) -> None:
    rng = random.Random(seed)
    entries = rng.sample(NETWORKS, rng.randint(0, len(NETWORKS)))
    networks = [parse_network(entry) for entry in entries]
    listed = NetworkList.parse(entries, "policy.trusted_networks")
    for ip in addresses(rng):
        plain = unmap(ip)
        expected = any(plain in network for network in networks)
        assert (ip in listed) is expected, (entries, ip)


def test_an_empty_list_holds_nothing() -> None:
    assert ipaddress.IPv4Address("127.0.0.1") not in NetworkList()
    assert ipaddress.IPv6Address("::1") not in NetworkList()
