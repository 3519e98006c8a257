"""DNS blocklists, looked up in the loopback DNS server's bl.lab and second.lab zones."""

from __future__ import annotations

import ipaddress
import time

import pytest
from conftest import LoopbackDNS
from policy_helpers import client, envelope, run

from mailgate.policy.base import Client, Verdict
from mailgate.policy.dnsbl import DnsblStep, query_name


def session(step: DnsblStep, who: Client) -> Verdict:
    async def go() -> Verdict:
        await step.connect(who)
        who.filter_state = "ACCEPT"
        return await step.mail(who, envelope())

    return run(go())


def test_query_names_follow_rfc_5782() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.10"), "bl.lab") == "10.2.0.192.bl.lab"
    assert query_name(ipaddress.ip_address("::ffff:192.0.2.10"), "bl.lab.") == "10.2.0.192.bl.lab"
    v6 = query_name(ipaddress.ip_address("2001:db8::bad"), "bl.lab")
    assert v6 == "d.a.b." + "0." * 21 + "8.b.d.0.1.0.0.2.bl.lab"


def test_listed_client_is_refused_at_mail_with_the_txt_reason(dns_server: LoopbackDNS) -> None:
    step = DnsblStep(dns_server.resolver(), ["bl.lab"])
    who = client("192.0.2.10")
    verdict = session(step, who)
    assert str(verdict.reply) == (
        "550 5.7.1 Client 192.0.2.10 is listed by bl.lab: Listed: see https://bl.lab/q?192.0.2.10"
    )
    assert who.filter_state == "DIALUP"
    assert verdict.tags == (("check", "dnsbl"), ("reason", "listed"), ("zone", "bl.lab"))


def test_listing_without_txt_says_listed(dns_server: LoopbackDNS) -> None:
    verdict = session(DnsblStep(dns_server.resolver(), ["bl.lab"]), client("192.0.2.11"))
    assert str(verdict.reply) == "550 5.7.1 Client 192.0.2.11 is listed by bl.lab: listed"


def test_ipv6_and_mapped_clients(dns_server: LoopbackDNS) -> None:
    step = DnsblStep(dns_server.resolver(), ["bl.lab"])
    verdict = session(step, client("2001:db8::bad"))
    assert verdict.reply is not None and "v6 spam source" in verdict.reply.text
    assert not session(step, client("::ffff:192.0.2.10")).accepted


def test_unlisted_client_is_accepted(dns_server: LoopbackDNS) -> None:
    who = client("192.0.2.99")
    assert session(DnsblStep(dns_server.resolver(), ["bl.lab", "second.lab"]), who).accepted
    assert "dnsbl" not in who.tags and "dnsbl_error" not in who.tags


def test_first_zone_in_configuration_order_decides(dns_server: LoopbackDNS) -> None:
    verdict = session(
        DnsblStep(dns_server.resolver(), ["second.lab", "bl.lab"]), client("192.0.2.10")
    )
    assert verdict.reply is not None and "by second.lab: second list" in verdict.reply.text
    verdict = session(
        DnsblStep(dns_server.resolver(), ["bl.lab", "second.lab"]), client("192.0.2.12")
    )
    assert verdict.reply is not None and "only on the second list" in verdict.reply.text


@pytest.mark.parametrize("zone", ["errcode.lab", "hijack.lab", "refused.lab", "zero.lab"])
def test_error_codes_and_non_loopback_answers_are_not_listings(
    dns_server: LoopbackDNS, zone: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 127.0.0.1 and 127.0.0.0 are no listing either (RFC 5782 5); each of these is
    # a list that does nothing, which an operator must hear of
    who = client("192.0.2.10")
    step = DnsblStep(dns_server.resolver(), [zone])
    assert run(step.connect(who)).tags == (("dnsbl_error", zone),)  # on the connect line
    assert session(step, who).accepted
    assert who.tags["dnsbl_error"] == zone
    assert any("an error code, not a listing" in r.message for r in caplog.records)


def test_a_listing_is_noted_on_the_connect_line(dns_server: LoopbackDNS) -> None:
    # also for a client that an allow rule or AUTH lets through at MAIL
    step = DnsblStep(dns_server.resolver(), ["bl.lab"])
    assert run(step.connect(client("192.0.2.10"))).tags == (("dnsbl", "bl.lab"),)
    assert run(step.connect(client("192.0.2.99"))).tags == ()


@pytest.mark.parametrize("zone", ["broken.lab", "slow.lab"])
def test_failing_lists_fail_open_and_are_tagged(dns_server: LoopbackDNS, zone: str) -> None:
    who = client("192.0.2.10")
    step = DnsblStep(dns_server.resolver(timeout=0.3), [zone, "bl.lab"])
    verdict = session(step, who)
    assert who.tags["dnsbl_error"] == zone
    assert verdict.reply is not None  # the working list still counts
    who = client("192.0.2.10")
    assert session(DnsblStep(dns_server.resolver(timeout=0.3), [zone]), who).accepted


def test_a_query_name_dns_cannot_hold_is_an_error_not_a_pass(dns_server: LoopbackDNS) -> None:
    # a zone so long that the reversed IPv6 address makes the name over 255 octets
    zone = ".".join(["z" * 60] * 4) + ".lab"
    who = client("2001:db8::1")
    assert session(DnsblStep(dns_server.resolver(), [zone]), who).accepted
    assert who.tags["dnsbl_error"] == zone


def test_trusted_authenticated_and_allowed_clients_pass(dns_server: LoopbackDNS) -> None:
    step = DnsblStep(dns_server.resolver(), ["bl.lab"])
    before = len(dns_server.zones.queries)
    assert session(step, client("192.0.2.10", trusted=True)).accepted
    assert len(dns_server.zones.queries) == before  # not even looked up

    who = client("192.0.2.10")
    who.tags["access_ip"] = "allow"  # set at connect by the access step before this one
    assert session(step, who).accepted

    async def authenticated_later() -> Verdict:
        who = client("192.0.2.10")
        await step.connect(who)
        who.auth_user = "alice"
        return await step.mail(who, envelope())

    assert run(authenticated_later()).accepted


def test_a_reason_slow_to_come_does_not_hold_the_listing(dns_server: LoopbackDNS) -> None:
    # the TXT lookup waited its whole timeout after the A had said "listed"
    step = DnsblStep(dns_server.resolver(timeout=5.0), ["txtlate.lab"])
    started = time.monotonic()
    verdict = session(step, client("192.0.2.10"))
    assert time.monotonic() - started < 4  # TXT_WAIT (1 s), not the 5 s timeout
    assert verdict.reply is not None and "listed" in verdict.reply.text
