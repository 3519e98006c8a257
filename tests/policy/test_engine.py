"""The engine and the factory: step order, trust, filter states, failures, reload."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import LoopbackDNS
from policy_helpers import Mailboxes, client, envelope, recipient, run

from mailgate.config.policy import GreylistConfig, PolicyConfig
from mailgate.config.schema import Config
from mailgate.policy.access import AccessStep
from mailgate.policy.base import ACCEPT, Client, Step, Verdict
from mailgate.policy.dnsbl import DnsblStep
from mailgate.policy.engine import PolicyEngine
from mailgate.policy.factory import build_policy
from mailgate.policy.helo import HeloStep
from mailgate.policy.hops import HopCountStep
from mailgate.policy.networks import NetworkList, parse_network
from mailgate.policy.recipient import RecipientStep
from mailgate.policy.reverse import ReverseNameStep
from mailgate.policy.sender import SenderDomainStep
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import reply

HOST = "mx.mailgate.lab"
BOXES = Mailboxes({"mailgate.lab"}, {"alice@mailgate.lab", "trap@mailgate.lab"})


class Spool:
    size = 0

    def read_head(self, limit: int) -> bytes:
        return b""


class Broken(Step):
    name = "broken"

    async def connect(self, client: Client) -> Verdict:
        raise RuntimeError("boom")

    async def helo(self, client: Client, name: str) -> Verdict:
        raise KeyError(name)

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        raise ZeroDivisionError

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict:
        raise AttributeError

    async def data(self, client: Client, envelope: Envelope) -> Verdict:
        raise OSError

    async def message(self, client: Client, envelope: Envelope, body: object) -> Verdict:
        raise ValueError


class Recorder(Step):
    """A site step: tags what it accepts, remembers that it ran."""

    name = "site"

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        self.ran.append("mail")
        return Verdict(tags=(("site", "seen"),))

    async def data(self, client: Client, envelope: Envelope) -> Verdict:
        self.ran.append("data")
        return Verdict(reply("access.delay"), tags=(("check", "site"),))


def config(dns: LoopbackDNS | None = None, **policy: object) -> Config:
    cfg = Config()
    policy.setdefault("reverse_lookup", dns is not None)  # no lookups off this machine
    cfg.policy = PolicyConfig(**policy)  # type: ignore[arg-type]
    if dns is not None:
        cfg.policy.dns_servers = [dns.address]
        cfg.policy.dns_timeout = 0.5
    return cfg


def test_factory_composes_steps_from_the_switches(dns_server: LoopbackDNS, tmp_path: Path) -> None:
    access = tmp_path / "access"
    access.write_text("deny ip 192.0.2.0/24\n")
    site = Recorder()
    engine = build_policy(
        config(dns_server, access_file=str(access), dnsbl_zones=["bl.lab"]),
        BOXES,
        HOST,
        extra_steps=[site],
    )
    kinds = [type(step) for step in engine.steps]
    assert kinds == [
        ReverseNameStep, HopCountStep, AccessStep, DnsblStep, HeloStep, SenderDomainStep,
        RecipientStep, Recorder,
    ]

    bare = build_policy(
        config(helo_checks=False, verify_sender_domain=False, reverse_lookup=False), BOXES, HOST
    )
    assert [type(step) for step in bare.steps] == [HopCountStep, RecipientStep]


def test_access_refusals_name_the_postmaster_of_a_local_domain(tmp_path: Path) -> None:
    # the host name mx.mailgate.lab is no local domain: postmaster@ it is refused, and
    # a denied sender was told to write there
    access = tmp_path / "access"
    access.write_text("deny sender spammer@*\n")
    engine = build_policy(config(access_file=str(access), verify_sender_domain=False),
                          BOXES, HOST)
    env = Envelope(sender=Address("spammer", "example.net"))
    verdict = run(engine.mail(client(), env))
    assert verdict.reply is not None
    assert "Contact postmaster@mailgate.lab for" in verdict.reply.text


def test_factory_adds_greylisting_when_enabled(tmp_path: Path) -> None:
    cfg = config(verify_sender_domain=False)
    cfg.greylist = GreylistConfig(enabled=True, sqlite_path=str(tmp_path / "grey.sqlite"))
    engine = build_policy(cfg, BOXES, HOST)
    assert [step.name for step in engine.steps][-2:] == ["rcpt", type(engine.steps[-1]).name]
    assert type(engine.steps[-1]).__module__ == "mailgate.policy.greylist"


def test_factory_refuses_a_broken_access_file(tmp_path: Path) -> None:
    access = tmp_path / "access"
    access.write_text("deny ip 192.0.2.0/33\n")
    with pytest.raises(ValueError, match=r"access:1: "):
        build_policy(config(access_file=str(access), verify_sender_domain=False), BOXES, HOST)


def test_local_names_from_config_and_caller_are_ours() -> None:
    engine = build_policy(
        config(local_names=["old.mailgate.lab"], verify_sender_domain=False),
        BOXES,
        HOST,
        local_names=["alias.mailgate.lab"],
    )
    for name in (HOST, "OLD.mailgate.lab", "alias.mailgate.lab"):
        verdict = run(engine.helo(client(), name))
        assert dict(verdict.tags)["reason"] == "impersonation"
    # our mail domains too (upas refused its -h domain): no outsider is example.org
    cfg = config(verify_sender_domain=False)
    cfg.delivery.local_domains = ["mailgate.lab"]
    verdict = run(build_policy(cfg, BOXES, HOST).helo(client(), "MailGate.lab"))
    assert dict(verdict.tags)["reason"] == "impersonation"


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.9.8.7", True),
        ("2001:db8:1::5", True),
        ("::ffff:10.0.0.1", True),
        ("11.0.0.1", False),
        ("2001:db8:2::5", False),
    ],
)
def test_trusted_networks(ip: str, trusted: bool) -> None:
    nets = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "2001:db8:1::/48"]
    engine = build_policy(config(trusted_networks=nets, verify_sender_domain=False), BOXES, HOST)
    who = client(ip)
    assert run(engine.connect(who)).accepted
    assert who.trusted is trusted
    assert who.filter_state == ("TRUSTED" if trusted else "ACCEPT")


def test_mapped_ipv6_networks_are_ipv4_networks() -> None:
    assert str(parse_network("::ffff:192.0.2.0/120")) == "192.0.2.0/24"
    with pytest.raises(ValueError):
        NetworkList.parse(["192.0.2.1/24"], "policy.trusted_networks")


def test_trusted_client_may_relay_untrusted_may_not() -> None:
    engine = build_policy(config(verify_sender_domain=False), BOXES, HOST)

    async def rcpt(who: Client, to: str) -> Verdict:
        await engine.connect(who)
        env = envelope("a@a.sender.lab")
        await engine.mail(who, env)
        return await engine.rcpt(who, env, recipient(to))

    assert run(rcpt(client("127.0.0.1"), "far@remote.lab")).accepted
    assert run(rcpt(client("203.0.113.1"), "far@remote.lab")).reply == reply("rcpt.relay_denied")
    assert run(rcpt(client("203.0.113.1"), "alice@mailgate.lab")).accepted


@pytest.mark.parametrize("stage", ["connect", "helo", "mail", "rcpt", "data", "message"])
def test_a_failing_step_becomes_451_4_3_0_never_an_exception(stage: str) -> None:
    site = Recorder()
    engine = PolicyEngine([Broken(), site], NetworkList())
    who, env = client(), envelope()
    calls = {
        "connect": lambda: engine.connect(who),
        "helo": lambda: engine.helo(who, "h.lab"),
        "mail": lambda: engine.mail(who, env),
        "rcpt": lambda: engine.rcpt(who, env, recipient("a@b.lab")),
        "data": lambda: engine.data(who, env),
        "message": lambda: engine.message(who, env, Spool()),
    }
    verdict = run(calls[stage]())
    assert str(verdict.reply) == "451 4.3.0 Internal error classifying message"
    assert verdict.tags == (("check", "broken"), ("reason", "internal"))
    assert site.ran == []  # nothing after the failure runs


def test_first_refusal_wins_and_accepting_tags_are_kept() -> None:
    site, later = Recorder(), Recorder()
    engine = PolicyEngine([site, later], NetworkList())
    who, env = client(), envelope()
    verdict = run(engine.mail(who, env))
    assert verdict.accepted and verdict.tags == (("site", "seen"), ("site", "seen"))
    verdict = run(engine.data(who, env))
    assert verdict.reply == reply("access.delay")
    assert site.ran == ["mail", "data"] and later.ran == ["mail"]
    assert run(PolicyEngine([], NetworkList()).rcpt(who, env, recipient("a@b.lab"))) == ACCEPT


def test_dnsbl_listing_is_refused_unless_an_allow_rule_matches(
    dns_server: LoopbackDNS, tmp_path: Path
) -> None:
    access = tmp_path / "access"
    access.write_text("allow sender friend@mx.sender.lab\nblock sender *@twomx.sender.lab\n")
    engine = build_policy(
        config(dns_server, access_file=str(access), dnsbl_zones=["bl.lab"]), BOXES, HOST
    )

    async def mail(sender: str) -> tuple[Verdict, str]:
        who = client("192.0.2.10")
        await engine.connect(who)
        await engine.helo(who, "mail.client.lab")
        verdict = await engine.mail(who, envelope(sender))
        return verdict, who.filter_state

    verdict, state = run(mail("someone@mx.sender.lab"))
    assert verdict.reply is not None and verdict.reply.name == "access.dnsbl"
    assert state == "DIALUP"
    verdict, state = run(mail("friend@mx.sender.lab"))
    assert verdict.accepted and state == "ACCEPT"
    verdict, state = run(mail("x@twomx.sender.lab"))  # block outranks the listing
    assert verdict.accepted and state == "BLOCKED"


def test_whole_session_through_the_engine(dns_server: LoopbackDNS, tmp_path: Path) -> None:
    access = tmp_path / "access"
    access.write_text("block recipient trap@mailgate.lab\n")
    engine = build_policy(
        config(
            dns_server,
            access_file=str(access),
            blocked_disposition="quarantine",
            quarantine_dir=str(tmp_path / "q"),
        ),
        BOXES,
        HOST,
    )

    async def go() -> list[Verdict]:
        who = client("203.0.113.50")
        env = envelope("bob@mx.sender.lab")
        out = [await engine.connect(who), await engine.helo(who, "mail.client.lab")]
        out.append(await engine.mail(who, env))
        for to in ("alice@mailgate.lab", "trap@mailgate.lab"):
            rcpt = recipient(to)
            out.append(await engine.rcpt(who, env, rcpt))
            env.recipients.append(rcpt)
        out.append(await engine.data(who, env))
        out.append(await engine.message(who, env, Spool()))
        # the next transaction starts afresh
        out.append(await engine.mail(who, envelope("bob@nothing.sender.lab")))
        return out

    *accepted, blocked, missing = run(go())
    assert all(v.accepted for v in accepted)
    assert blocked.reply == reply("access.blocked")
    assert ("disposition", "quarantine") in blocked.tags
    assert ("quarantine_dir", str(tmp_path / "q")) in blocked.tags
    assert str(missing.reply) == "550 5.1.8 Sender domain must exist: nothing.sender.lab"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("trusted_networks", ["10.0.0.1/8"], "policy.trusted_networks"),
        ("trusted_networks", ["nonsense"], "policy.trusted_networks"),
        ("dns_servers", ["ns1.lab"], "policy.dns_servers"),
        ("dns_servers", ["127.0.0.1:99999"], "policy.dns_servers"),
        ("dns_timeout", 0, "policy.dns_timeout"),
        ("helo_refusal", "shout", "policy.helo_refusal"),
        ("blocked_disposition", "keep", "policy.blocked_disposition"),
        ("dnsbl_zones", ["bad zone"], "policy.dnsbl_zones"),
    ],
)
def test_policy_config_validation(field: str, value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        PolicyConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"policy\.quarantine_dir"):
        PolicyConfig(blocked_disposition="quarantine")


def test_a_client_address_of_the_wrong_type_is_untrusted_not_a_crash() -> None:
    engine = PolicyEngine([], NetworkList.parse(["127.0.0.0/8"], "policy.trusted_networks"))
    who = Client(ip="127.0.0.1")  # type: ignore[arg-type]
    assert run(engine.connect(who)).accepted
    assert who.trusted is False and who.filter_state == "ACCEPT"
