"""Sender domain verification against the loopback DNS server."""

from __future__ import annotations

import pytest
from conftest import LoopbackDNS
from policy_helpers import client, envelope, run

from mailgate.policy.sender import Domain, SenderDomainStep


@pytest.fixture
def step(dns_server: LoopbackDNS) -> SenderDomainStep:
    return SenderDomainStep(dns_server.resolver(timeout=0.3))


def refusal(step: SenderDomainStep, sender: str | None, **kw: object) -> str | None:
    verdict = run(step.mail(client(**kw), envelope(sender)))  # type: ignore[arg-type]
    return None if verdict.reply is None else str(verdict.reply)


@pytest.mark.parametrize(
    "sender",
    [
        "bob@mx.sender.lab",
        "bob@a.sender.lab",  # NoAnswer for MX, but an A record: exists
        "bob@aaaa.sender.lab",  # only AAAA: exists
        "bob@twomx.sender.lab",  # MX 0 . next to a real MX is not a null MX
        "bob@DEEP.Sub.Sender.Lab",
        "",  # the null sender <> is always accepted
        "bob@[192.0.2.7]",  # an address literal names no domain to look up
        "postmaster",  # domainless: nothing to look up
    ],
)
def test_existing_domains_and_special_senders_are_accepted(
    step: SenderDomainStep, sender: str
) -> None:
    assert refusal(step, sender) is None


def test_missing_domain_is_550_5_1_8(step: SenderDomainStep) -> None:
    reply = refusal(step, "bob@nothing.sender.lab")
    assert reply == "550 5.1.8 Sender domain must exist: nothing.sender.lab"


def test_domain_without_mail_records_is_missing(step: SenderDomainStep) -> None:
    assert (refusal(step, "bob@txtonly.sender.lab") or "").startswith("550 5.1.8 ")


def test_null_mx_is_550_5_7_27(step: SenderDomainStep) -> None:
    reply = refusal(step, "bob@nullmx.sender.lab")
    assert reply == "550 5.7.27 Sender domain nullmx.sender.lab does not accept mail (null MX)"
    # "MX 10 ." names no host either: bounces could never arrive
    reply = refusal(step, "bob@rootmx.sender.lab")
    assert reply == "550 5.7.27 Sender domain rootmx.sender.lab does not accept mail (null MX)"


@pytest.mark.parametrize("domain", ["x.servfail.sender.lab", "x.silent.sender.lab"])
def test_servfail_and_timeout_are_451_4_4_3(step: SenderDomainStep, domain: str) -> None:
    reply = refusal(step, f"bob@{domain}")
    assert reply == f"451 4.4.3 Temporary DNS failure looking up sender domain {domain}"


def test_verdict_is_tagged_for_the_log(step: SenderDomainStep) -> None:
    verdict = run(step.mail(client(), envelope("bob@nullmx.sender.lab")))
    assert verdict.tags == (("check", "sender"), ("reason", "null_mx"))


def test_trusted_and_authenticated_clients_are_not_checked(
    step: SenderDomainStep, dns_server: LoopbackDNS
) -> None:
    assert refusal(step, "bob@trusted-skip.sender.lab", trusted=True) is None
    assert refusal(step, "bob@auth-skip.sender.lab", auth_user="bob") is None
    assert dns_server.asked("trusted-skip.sender.lab") == []
    assert dns_server.asked("auth-skip.sender.lab") == []


def test_lookups_ask_mx_a_and_aaaa(step: SenderDomainStep, dns_server: LoopbackDNS) -> None:
    # (an implicit MX: a domain with an A or AAAA record and no MX takes mail)
    assert run(step.classify("a.sender.lab")) is Domain.EXISTS
    assert sorted(set(dns_server.asked("a.sender.lab"))) == ["A", "AAAA", "MX"]
    # an NXDOMAIN, for the name whatever the type, is the answer at once
    assert run(step.classify("asked.sender.lab")) is Domain.MISSING


@pytest.mark.parametrize(
    "domain",
    ["a..b", "x" * 300, "\x00\r\n", "ü-nicode.lab", "-.-", ".", "[not-a-literal", "a b"],
)
def test_weird_domains_never_raise_and_are_refused(step: SenderDomainStep, domain: str) -> None:
    reply = refusal(step, f"bob@{domain}")
    assert reply is not None
    assert reply[:3] in ("550", "451")
    assert "\r" not in reply and "\n" not in reply
