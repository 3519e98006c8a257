"""The client's forward-confirmed DNS name, against the loopback DNS server."""

from __future__ import annotations

import ipaddress
import time

import pytest
from conftest import LoopbackDNS
from policy_helpers import client, run

from mailgate.policy.reverse import ReverseNameStep


@pytest.mark.parametrize(
    ("ip", "name"),
    [
        ("192.0.2.25", "mail.sender.lab"),  # PTR, and its A record points back
        ("::ffff:192.0.2.25", "mail.sender.lab"),  # a dual-stack listener's IPv4 client
        ("2001:db8::1", "aaaa.sender.lab"),  # by its AAAA record
        ("192.0.2.26", None),  # a.sender.lab is 192.0.2.1: anyone can write a PTR record
        ("192.0.2.27", None),  # no host name (an underscore): never into a header
        ("192.0.2.28", "two.sender.lab"),  # the name that confirms, in lower case
        ("192.0.2.29", None),  # its forward lookup fails
        ("192.0.2.99", None),  # no PTR record
    ],
)
def test_confirmed_names(dns_server: LoopbackDNS, ip: str, name: str | None) -> None:
    step = ReverseNameStep(dns_server.resolver(timeout=0.3))
    assert run(step.confirmed_name(ipaddress.ip_address(ip))) == name


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_this_machine_is_localhost_without_a_lookup(dns_server: LoopbackDNS, ip: str) -> None:
    step = ReverseNameStep(dns_server.resolver())
    before = len(dns_server.zones.queries)
    who = client(ip)
    assert run(step.connect(who)).accepted
    assert who.reverse_name == "localhost"
    assert len(dns_server.zones.queries) == before


def test_the_lookup_starts_at_connect_and_is_awaited_at_helo(dns_server: LoopbackDNS) -> None:
    step = ReverseNameStep(dns_server.resolver(timeout=0.3))

    async def session(ip: str) -> tuple[bool, str | None, bool]:
        who = client(ip)
        accepted = (await step.connect(who)).accepted
        started = who.name_lookup is not None and who.reverse_name is None
        accepted = accepted and (await step.helo(who, "client.sender.lab")).accepted
        assert who.name_lookup is None
        return accepted and started, who.reverse_name, accepted

    for ip, name in (("192.0.2.25", "mail.sender.lab"), ("192.0.2.99", None)):
        assert run(session(ip)) == (True, name, True)  # never a refusal


def test_the_ptr_and_forward_lookups_share_one_timeout(dns_server: LoopbackDNS) -> None:
    # a PTR that comes late and a forward lookup that never does took two timeouts
    # (the EHLO reply waits for the name)
    step = ReverseNameStep(dns_server.resolver(timeout=2.0))
    started = time.monotonic()
    assert run(step.confirmed_name(ipaddress.ip_address("192.0.2.32"))) is None
    assert time.monotonic() - started < 2.5  # one timeout (and a little), not 2.8
