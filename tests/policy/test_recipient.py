"""Recipients and relay control, including the classic relay tricks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import Mailboxes, client, envelope, recipient, run

from mailgate.policy.base import Client
from mailgate.policy.recipient import RecipientStep
from mailgate.protocol.envelope import Address, Recipient

HOST = "mx.mailgate.lab"
BOXES = Mailboxes(
    domains={"mailgate.lab", "mx.mailgate.lab", "other.lab"},
    users={"alice@mailgate.lab", "bob@other.lab", "root@mx.mailgate.lab", "alice@mx.mailgate.lab",
           "postmaster@mx.mailgate.lab"},
    postmaster_domain="mx.mailgate.lab",
)


def outcome(rcpt: Recipient, who: Client | None = None, loopback: bool = False) -> str:
    step = RecipientStep(BOXES, HOST, allow_loopback_literal=loopback)
    verdict = run(step.rcpt(who or client(), envelope(), rcpt))
    return "ok" if verdict.accepted else verdict.reply.name  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text", ["alice@mailgate.lab", "Alice@MailGate.LAB", "bob@other.lab", "root@mx.mailgate.lab"]
)
def test_local_users_are_accepted(text: str) -> None:
    assert outcome(recipient(text)) == "ok"


def test_unknown_local_user_is_550_5_1_1() -> None:
    step = RecipientStep(BOXES, HOST, allow_loopback_literal=False)
    verdict = run(step.rcpt(client(), envelope(), recipient("carol@mailgate.lab")))
    assert str(verdict.reply) == "550 5.1.1 <carol@mailgate.lab> ... user unknown"
    assert verdict.tags == (("check", "rcpt"), ("reason", "unknown"))


@pytest.mark.parametrize("text", ["Postmaster", "postmaster", "POSTMASTER"])
def test_bare_postmaster_is_always_accepted(text: str) -> None:
    assert outcome(Recipient(Address(text, ""))) == "ok"


def test_bare_postmaster_is_the_postmaster_of_the_mailboxes_domain() -> None:
    # the host name need not be a local domain (mx.example.org taking mail for
    # example.org): the mailboxes say whose postmaster <Postmaster> is
    boxes = Mailboxes(domains={"mailgate.lab"}, users={"postmaster@mailgate.lab"})
    step = RecipientStep(boxes, HOST, allow_loopback_literal=False)
    assert run(step.rcpt(client(), envelope(), Recipient(Address("Postmaster", "")))).accepted


def test_bare_postmaster_without_a_mailbox_is_refused_at_rcpt_not_after_the_data() -> None:
    boxes = Mailboxes(domains={"mx.mailgate.lab"}, users={"alice@mx.mailgate.lab"})
    step = RecipientStep(boxes, HOST, allow_loopback_literal=False)
    verdict = run(step.rcpt(client(), envelope(), Recipient(Address("Postmaster", ""))))
    assert str(verdict.reply) == "550 5.1.1 <Postmaster> ... user unknown"


def test_remote_recipient_from_untrusted_client_is_relay_denied() -> None:
    step = RecipientStep(BOXES, HOST, allow_loopback_literal=False)
    verdict = run(step.rcpt(client(), envelope(), recipient("victim@remote.lab")))
    assert str(verdict.reply) == "550 5.7.1 Relaying denied"


@pytest.mark.parametrize(
    "who",
    [client("10.1.2.3", trusted=True), client("198.51.100.7", auth_user="alice")],
    ids=["trusted", "authenticated"],
)
def test_trusted_and_authenticated_clients_may_relay(who: Client) -> None:
    assert outcome(recipient("friend@remote.lab"), who) == "ok"
    assert outcome(recipient("friend@[198.51.100.99]"), who) == "ok"


class _Relaying(Mailboxes):
    """Mailboxes that say whether they have a way out for other domains."""

    def __init__(self, relay: bool) -> None:
        super().__init__(BOXES.domains, BOXES.users)
        self.relay = relay

    def can_relay(self) -> bool:
        return self.relay


@pytest.mark.parametrize(
    "who",
    [client("10.1.2.3", trusted=True), client("198.51.100.7", auth_user="alice")],
    ids=["trusted", "authenticated"],
)
def test_with_no_relay_a_remote_recipient_is_refused_at_rcpt(who: Client) -> None:
    # not 250 now and 550 after the data, which would fail the message's local
    # recipients too (451: sent again, delivered twice)
    step = RecipientStep(_Relaying(relay=False), HOST, allow_loopback_literal=False)
    verdict = run(step.rcpt(who, envelope(), recipient("friend@remote.lab")))
    assert str(verdict.reply) == (
        "550 5.4.4 No route to <friend@remote.lab>: this server relays to no other domain"
    )
    assert verdict.tags == (("check", "rcpt"), ("reason", "no_route"))
    assert run(step.rcpt(who, envelope(), recipient("alice@mailgate.lab"))).accepted
    # an untrusted client still hears only that it may not relay
    untrusted = run(step.rcpt(client(), envelope(), recipient("friend@remote.lab")))
    assert str(untrusted.reply) == "550 5.7.1 Relaying denied"
    relaying = RecipientStep(_Relaying(relay=True), HOST, allow_loopback_literal=False)
    assert run(relaying.rcpt(who, envelope(), recipient("friend@remote.lab"))).accepted


@pytest.mark.parametrize(
    "rcpt",
    [
        recipient("user%remote.lab@mailgate.lab"),  # percent hack
        recipient("remote.lab!user@mailgate.lab"),  # bang path
        recipient("user@remote.lab@mailgate.lab"),  # double @ (the grammar refuses it too)
        Recipient(Address("user@remote.lab", "mailgate.lab", quoted=True)),  # "user@remote"@local
        Recipient(Address("user%remote.lab", "mailgate.lab", quoted=True)),
        recipient("user@remote.lab"),  # @local:user@remote once the source route is dropped
        recipient("user@[198.51.100.99]"),  # a literal that is not ours
        recipient("alice%mailgate.lab@mailgate.lab"),  # even when the route leads home
    ],
    ids=[
        "percent",
        "bang",
        "double-at",
        "quoted-at",
        "quoted-percent",
        "source-route",
        "foreign-literal",
        "percent-home",
    ],
)
def test_relay_tricks_never_relay(rcpt: Recipient) -> None:
    assert outcome(rcpt) == "rcpt.relay_denied"


def test_literal_of_our_own_address_is_local() -> None:
    assert outcome(recipient("alice@[192.0.2.250]")) == "ok"
    assert outcome(recipient("nobody@[192.0.2.250]")) == "rcpt.unknown"


def test_loopback_form_needs_the_switch() -> None:
    assert outcome(recipient("alice@[]")) == "rcpt.loopback_disabled"
    assert outcome(recipient("alice@[]"), loopback=True) == "ok"
    assert outcome(recipient("nobody@[]"), loopback=True) == "rcpt.unknown"


def test_local_forms_go_to_the_mailboxes_home_domain_not_the_host_name() -> None:
    # mx.mailgate.lab takes mail for mailgate.lab only: root@[] and root@[our address]
    # were made root@mx.mailgate.lab and refused (no route, or relaying denied)
    boxes = Mailboxes(domains={"mailgate.lab"}, users={"root@mailgate.lab"})
    step = RecipientStep(boxes, HOST, allow_loopback_literal=True)
    for text in ("root@[]", "root@[192.0.2.250]"):
        rcpt = recipient(text)
        assert run(step.rcpt(client(), envelope(), rcpt)).accepted, text
        assert str(rcpt.address) == "root@mailgate.lab"


def test_domainless_recipient_is_a_user_of_this_host() -> None:
    assert outcome(Recipient(Address("root", ""))) == "ok"
    assert outcome(Recipient(Address("nobody", ""))) == "rcpt.unknown"


@settings(max_examples=300, deadline=None)
@given(
    local=st.text(max_size=80),
    domain=st.one_of(st.text(max_size=80), st.sampled_from(["mailgate.lab", "[]", "[", "[::1]"])),
    quoted=st.booleans(),
    trusted=st.booleans(),
)
def test_weird_addresses_never_raise(local: str, domain: str, quoted: bool, trusted: bool) -> None:
    result = outcome(Recipient(Address(local, domain, quoted)), client(trusted=trusted))
    assert result in ("ok", "rcpt.unknown", "rcpt.relay_denied", "rcpt.loopback_disabled")
    if not trusted and set(local) & set("%!@"):
        assert result == "rcpt.relay_denied"


def test_a_downstream_refusal_is_passed_on_as_it_was_said() -> None:
    # a full mailbox at the LMTP check is no "user unknown" (550 5.1.1)
    from mailgate.protocol.replies import reply as make_reply

    full = make_reply("delivery.downstream_rcpt_perm", address="alice@mailgate.lab")
    full = full.with_status("5.2.2")

    class Verifying(Mailboxes):
        async def verify_recipient(self, local: str, domain: str) -> object:
            return full

    boxes = Verifying(domains={"mailgate.lab"}, users={"alice@mailgate.lab"})
    step = RecipientStep(boxes, HOST, allow_loopback_literal=False)  # type: ignore[arg-type]
    verdict = run(step.rcpt(client(), envelope(), recipient("alice@mailgate.lab")))
    assert verdict.reply is full
    assert dict(verdict.tags)["reason"] == "downstream_refused"
