"""The resolver wrapper against the loopback DNS server: every outcome, never a raise."""

from __future__ import annotations

import socket

import pytest
from conftest import LoopbackDNS
from policy_helpers import run

from mailgate.policy.dns import Resolver, Status


@pytest.mark.parametrize(
    ("name", "rdtype", "status"),
    [
        ("a.sender.lab", "A", Status.FOUND),
        ("a.sender.lab", "MX", Status.NODATA),
        ("aaaa.sender.lab", "AAAA", Status.FOUND),
        ("nothing.sender.lab", "A", Status.NXDOMAIN),
        ("sub.sender.lab", "A", Status.NODATA),  # empty non-terminal above deep.sub
        ("x.servfail.sender.lab", "A", Status.TEMPFAIL),
        ("x.silent.sender.lab", "A", Status.TEMPFAIL),
        ("a..b", "A", Status.INVALID),
        ("x" * 64 + ".lab", "A", Status.INVALID),
        ("", "A", Status.INVALID),
    ],
)
def test_lookup_outcomes(dns_server: LoopbackDNS, name: str, rdtype: str, status: Status) -> None:
    answer = run(dns_server.resolver(timeout=0.3).lookup(name, rdtype))
    assert answer.status is status
    assert bool(answer.records) == (status is Status.FOUND)


def test_records_are_returned(dns_server: LoopbackDNS) -> None:
    answer = run(dns_server.resolver().lookup("mx.sender.lab", "MX"))
    assert [(r.preference, r.exchange.to_text()) for r in answer.records] == [  # type: ignore[attr-defined]
        (10, "mail.sender.lab.")
    ]


def test_names_are_absolute_and_lowercase_insensitive(dns_server: LoopbackDNS) -> None:
    answer = run(dns_server.resolver().lookup("A.Sender.LAB.", "A"))
    assert answer.status is Status.FOUND


@pytest.mark.parametrize("weird", ["\x00", "a b.lab", "ü.lab", "\udcff.lab", "." * 5, "-" * 300])
def test_weird_names_never_raise(dns_server: LoopbackDNS, weird: str) -> None:
    answer = run(dns_server.resolver(timeout=0.3).lookup(weird, "A"))
    assert answer.status in (Status.INVALID, Status.NXDOMAIN, Status.TEMPFAIL)


def test_nameserver_with_ipv6_bracket_syntax_is_accepted() -> None:
    Resolver(["[::1]:5353", "127.0.0.1"], 1.0)


def test_bad_nameserver_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"not an ip or ip:port: 'ns\.example\.org'"):
        Resolver(["ns.example.org"], 1.0)


def test_an_internationalized_name_is_asked_in_its_a_labels(dns_server: LoopbackDNS) -> None:
    # dnspython's default codec is IDNA2003 unless the idna package is installed
    # (mailgate does not need it; tests pull it in): set so, straße.sender.lab would
    # be asked as strasse.sender.lab, another domain.
    import dns.name

    previous = dns.name.IDNA_DEFAULT
    dns.name.set_default_idna_codec(dns.name.IDNA_2003_Practical)
    try:
        found = run(dns_server.resolver().lookup("Straße.sender.lab", "A"))
    finally:
        dns.name.set_default_idna_codec(previous)
    assert found.status is Status.FOUND
    assert dns_server.asked("xn--strae-oqa.sender.lab") == ["A"]
    assert dns_server.asked("strasse.sender.lab") == []


def test_answers_are_kept_for_their_ttl(dns_server: LoopbackDNS) -> None:
    # The same senders and clients come back connection after connection.
    resolver = dns_server.resolver()
    before = len(dns_server.asked("deep.sub.sender.lab"))
    first = run(resolver.lookup("deep.sub.sender.lab", "A"))
    second = run(resolver.lookup("Deep.Sub.Sender.Lab", "A"))
    assert first == second and first.status is Status.FOUND
    assert len(dns_server.asked("deep.sub.sender.lab")) == before + 1
    # another resolver (a reload builds one) asks again
    run(dns_server.resolver().lookup("deep.sub.sender.lab", "A"))
    assert len(dns_server.asked("deep.sub.sender.lab")) == before + 2


def test_a_dead_first_nameserver_leaves_time_for_the_next(dns_server: LoopbackDNS) -> None:
    # One try with the whole budget never reached the second server: every lookup
    # failed (a listed client got through the DNSBL, mail of existing domains 451).
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    dead.bind(("127.0.0.1", 0))
    try:
        resolver = Resolver([f"127.0.0.1:{dead.getsockname()[1]}", dns_server.address], 2.0)
        answer = run(resolver.lookup("a.sender.lab", "A"))
    finally:
        dead.close()
    assert answer.status is Status.FOUND
