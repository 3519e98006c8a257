"""Recipient rules of the access list hold for every spelling of the mailbox they
name: alice+x@ and alice@[our address] reach alice, and so does a rule about her."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from mailgate.app import build_context
from mailgate.config.loader import load_config
from mailgate.policy.base import Client, Verdict
from mailgate.policy.engine import PolicyEngine
from mailgate.protocol.envelope import Address, Envelope, Recipient

OURS = ipaddress.ip_address("192.0.2.1")


@pytest.fixture
def policy(tmp_path: Path) -> PolicyEngine:
    (tmp_path / "access").write_text(
        "deny recipient denied@mailgate.org\n"
        "block recipient trap@mailgate.org\n"
        "deny recipient dave@mailgate.org\n"
        "delay recipient dave*@mailgate.org\n"
        "deny recipient bob+spam@mailgate.org\n"
    )
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[server]\nhostname = "mx.mailgate.org"\nspool_dir = "{tmp_path}/s"\n'
        f'[policy]\nverify_sender_domain = false\ntrusted_networks = []\n'
        f'access_file = "{tmp_path}/access"\n'
        f'[delivery]\nmaildir_root = "{tmp_path}/m"\nlocal_domains = ["mailgate.org"]\n'
        'system_users = false\nlocal_users = ["denied", "trap", "bob", "dave"]\n'
    )
    return build_context(load_config(str(path))).policy


def _rcpt(policy: PolicyEngine, address: str) -> tuple[Verdict, str]:
    client = Client(ip=ipaddress.ip_address("198.51.100.7"), local_ip=OURS)
    local, _, domain = address.rpartition("@")
    envelope = Envelope(helo="client.example.net", sender=Address("s", "example.net"))

    async def go() -> Verdict:
        await policy.connect(client)
        await policy.mail(client, envelope)
        return await policy.rcpt(client, envelope, Recipient(Address(local, domain)))

    verdict = asyncio.run(go())
    return verdict, client.filter_state


@pytest.mark.parametrize(
    "address", ["denied@mailgate.org", "denied+x@mailgate.org", "Denied+x@MAILGATE.org",
                "denied@[192.0.2.1]", "denied+y@[IPv6:::ffff:192.0.2.1]",
                # the strongest rule of every spelling: deny over a delay that
                # matches dave+x as written (it answered 451)
                "dave+x@mailgate.org",
                # a rule naming a +detail address holds for its literal spelling
                "bob+spam@[192.0.2.1]", "BOB+Spam@[192.0.2.1]"],
)
def test_a_denied_recipient_is_denied_in_every_spelling(
    policy: PolicyEngine, address: str
) -> None:
    verdict, _ = _rcpt(policy, address)
    assert verdict.reply is not None and str(verdict.reply).startswith("550 5.7.1 ")


def test_a_spam_trap_catches_its_detail_addresses_and_others_pass(policy: PolicyEngine) -> None:
    verdict, state = _rcpt(policy, "trap+x@mailgate.org")
    assert verdict.accepted and state == "BLOCKED"  # (refused after the data)
    verdict, state = _rcpt(policy, "bob+x@mailgate.org")
    assert verdict.accepted and state == "ACCEPT"
