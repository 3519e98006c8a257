"""HELO/EHLO name checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import client, run

from mailgate.policy.base import Client
from mailgate.policy.helo import HeloStep

HOST = "mx.mailgate.lab"


def step(**kw: object) -> HeloStep:
    return HeloStep(HOST, ["Alias.Mailgate.Lab"], **kw)  # type: ignore[arg-type]


def reason(name: str, who: Client | None = None, **kw: object) -> str | None:
    verdict = run(step(**kw).helo(who or client(), name))
    return None if verdict.accepted else dict(verdict.tags)["reason"]


@pytest.mark.parametrize(
    "name",
    [
        "mail.client.lab",
        "Mail.Client.LAB.",  # trailing dot: the same name
        "xn--bcher-kva.ch",  # punycode labels are ordinary labels
        "mx1.xn--80ak6aa92e.xn--p1ai",
        "[203.0.113.5]",
        "[IPv6:2001:db8::5]",
        "[ipv6:2001:DB8::5]",
        "a1.b2",
        "example.community",  # only example.com/net/org are reserved, not look-alikes
        "mytest.lab",
        "localhost.lab",  # reserved only as the last label
    ],
)
def test_good_names_are_accepted(name: str) -> None:
    assert reason(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("mx.mailgate.lab", "impersonation"),
        ("MX.MAILGATE.LAB", "impersonation"),
        ("alias.mailgate.lab.", "impersonation"),
        ("localhost", "rfc2606"),
        ("LOCALHOST", "rfc2606"),
        ("localhost.localdomain", "rfc2606"),
        ("host.LocalDomain", "rfc2606"),
        ("mail.example", "rfc2606"),
        ("a.b.invalid", "rfc2606"),
        ("box.Test", "rfc2606"),
        ("example.com", "rfc2606"),
        ("mail.EXAMPLE.net", "rfc2606"),
        ("deep.sub.example.org", "rfc2606"),
        ("foo", "nodot"),
        ("xn--bcher-kva", "nodot"),
        ("192.0.2.1", "noletter"),
        ("123.456", "noletter"),
        ("[300.1.1.1]", "literal"),
        ("[]", "literal"),
        ("[IPv6:zz::1]", "literal"),
        ("[mail.client.lab]", "literal"),
        ("", "empty"),
        ("  ", "empty"),
    ],
)
def test_bad_names_are_refused_with_their_reason(name: str, why: str) -> None:
    assert reason(name) == why


def test_our_internationalized_name_in_a_labels_is_our_name() -> None:
    ours = HeloStep(HOST, ["bücher.lab"])
    for name in ("xn--bcher-kva.lab", "BÜCHER.lab"):
        assert dict(run(ours.helo(client(), name)).tags)["reason"] == "impersonation"


def test_refusal_is_550_5_7_1_and_the_session_goes_on() -> None:
    verdict = run(step().helo(client(), "localhost"))
    assert str(verdict.reply) == (
        "550 5.7.1 HELO/EHLO name localhost refused: reserved name (RFC 2606)"
    )
    assert verdict.close is False
    assert verdict.tags == (("check", "helo"), ("reason", "rfc2606"))


@pytest.mark.parametrize("listener", ["submission", "smtps"])
@pytest.mark.parametrize("name", ["DESKTOP-ABC123", "localhost", "vm", "mx.example.org"])
def test_mail_programs_on_submission_listeners_name_their_machine_as_they_please(
    listener: str, name: str
) -> None:
    # Outlook says DESKTOP-ABC123, msmtp localhost: refused at EHLO, the user could
    # never reach AUTH (RFC 6409 4.3: authentication is what protects these ports)
    assert run(step().helo(client(listener=listener), name)).reply is None
    assert run(step().helo(client(listener="public"), name)).reply is not None


def test_hangup_mode_answers_421_and_closes() -> None:
    verdict = run(step(refusal="hangup").helo(client(), "foo"))
    assert verdict.close is True
    assert str(verdict.reply) == (
        f"421 4.7.1 {HOST} HELO/EHLO name foo refused: no dot in name; closing connection"
    )


def test_trusted_clients_are_exempt_only_from_dot_and_letter_rules() -> None:
    trusted = client("10.0.0.5", trusted=True)
    assert reason("foo", trusted) is None
    assert reason("192.0.2.1", trusted) is None
    assert reason("localhost", trusted) == "rfc2606"
    assert reason("mail.example.com", trusted) == "rfc2606"
    assert reason(HOST, trusted) == "impersonation"


def test_our_own_name_is_allowed_when_the_client_is_this_machine() -> None:
    itself = client("192.0.2.250", local_ip="192.0.2.250", trusted=True)
    assert reason(HOST, itself) is None
    mapped = client("::ffff:192.0.2.250", local_ip="192.0.2.250", trusted=True)
    assert reason(HOST, mapped) is None
    neighbour = client("192.0.2.9", local_ip="192.0.2.250", trusted=True)
    assert reason(HOST, neighbour) == "impersonation"
    # only while trusted: behind a local proxy every client comes from this machine
    assert reason(HOST, client("127.0.0.1", local_ip="127.0.0.1")) == "impersonation"


def test_this_machine_may_call_itself_localhost() -> None:
    itself = client("127.0.0.1", local_ip="127.0.0.1", trusted=True)  # the default trust
    for name in ("localhost", "LOCALHOST", "localhost.localdomain", "box.test"):
        assert reason(name, itself) is None
    # another loopback address is another socket of this machine too
    assert reason("localhost", client("127.0.0.2", local_ip="127.0.0.2", trusted=True)) is None
    # only from itself: a trusted neighbour saying localhost is still refused
    assert reason("localhost", client("10.0.0.5", local_ip="10.0.0.1", trusted=True)) == "rfc2606"
    # and only while trusted (a local proxy's clients all come from 127.0.0.1)
    assert reason("localhost", client("127.0.0.1", local_ip="127.0.0.1")) == "rfc2606"


def test_literal_must_match_the_client_when_configured() -> None:
    assert reason("[198.51.100.1]") is None  # off by default
    assert reason("[198.51.100.1]", literal_must_match=True) == "literal_mismatch"
    assert reason("[203.0.113.5]", literal_must_match=True) is None
    v6 = client("2001:db8::5")
    assert reason("[IPv6:2001:DB8:0::5]", v6, literal_must_match=True) is None
    assert reason("[IPv6:2001:db8::6]", v6, literal_must_match=True) == "literal_mismatch"
    # an IPv4 client seen on a dual-stack socket still matches its IPv4 literal
    mapped = client("::ffff:203.0.113.5")
    assert reason("[203.0.113.5]", mapped, literal_must_match=True) is None


WEIRD = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="[]:.-xn0123456789abcdefIPv6 \r\n\x00\u0130\u00df", max_size=60),
)


@settings(max_examples=400, deadline=None)
@given(name=WEIRD, trusted=st.booleans(), hangup=st.booleans())
def test_weird_names_never_raise_and_never_inject_lines(
    name: str, trusted: bool, hangup: bool
) -> None:
    helo = step(refusal="hangup" if hangup else "reply", literal_must_match=True)
    verdict = run(helo.helo(client(trusted=trusted), name))
    if verdict.reply is not None:
        wire = verdict.reply.to_bytes()
        assert wire.count(b"\r\n") == 1 and wire.endswith(b"\r\n")
        assert wire[:3] in (b"550", b"421")
        assert verdict.close == hangup


def test_a_stranger_claiming_our_address_is_refused_as_claiming_our_name() -> None:
    # (the address it connected to, or one local_names lists as a literal)
    helo = HeloStep(HOST, ["[198.51.100.7]", "[IPv6:2001:db8::25]"])
    stranger = client("203.0.113.5", local_ip="192.0.2.250")
    for claim in ("[192.0.2.250]", "[198.51.100.7]", "[IPv6:2001:db8::25]",
                  "[IPv6:::ffff:192.0.2.250]"):
        verdict = run(helo.helo(stranger, claim))
        assert verdict.reply is not None and "that is my address" in verdict.reply.text, claim
    assert run(helo.helo(stranger, "[203.0.113.5]")).reply is None  # its own: fine
    # this machine talking to itself names its own address, trusted or not
    for trusted in (True, False):
        itself = client("192.0.2.250", local_ip="192.0.2.250", trusted=trusted)
        assert run(helo.helo(itself, "[192.0.2.250]")).reply is None
