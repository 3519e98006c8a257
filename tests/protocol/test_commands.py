"""Item 1: every command, the RFC 5321 4.1.2 grammar, and the reply for each error kind."""

from __future__ import annotations

import pytest
from protocol_helpers import HOST, Session, codes, scripted, well_formed

from mailgate.protocol import events as ev
from mailgate.protocol.envelope import Address
from mailgate.protocol.replies import reply


def test_greeting_names_host_and_esmtp() -> None:
    s = Session()
    assert s.greeting == f"220 {HOST} ESMTP mailgate\r\n".encode()


@pytest.mark.parametrize("verb", ["EHLO", "ehlo", "EhLo"])
def test_verbs_are_case_insensitive(verb: str) -> None:
    s = Session()
    out = s.send(f"{verb} client.example.net\r\n")
    assert out[0] == f"250-{HOST} you are client.example.net"
    assert codes(s.send("nOoP\r\n")) == ["250 2.0.0"]
    assert codes(s.send("mail from:<a@example.net>\r\n")) == ["250 2.1.0"]
    assert codes(s.send("rcpt To:<b@example.org>\r\n")) == ["250 2.1.5"]
    assert codes(s.send("rset\r\n")) == ["250 2.0.0"]


def test_helo_plain_reply_and_no_extensions() -> None:
    s = Session()
    assert s.send("HELO client.example.net\r\n") == [f"250 {HOST} you are client.example.net"]
    assert s.of(ev.Helo) == [ev.Helo("client.example.net", False)]


def test_non_ascii_verb_is_not_folded_into_a_command() -> None:
    # "ma\u0131l".upper() == "MAIL" in Python; SMTP verbs are ASCII.
    s = Session()
    s.ehlo()
    assert codes(s.send("ma\u0131l FROM:<a@example.net>\r\n")) == ["500 5.5.1"]
    assert s.conn.envelope is None


@pytest.mark.parametrize(
    "line",
    ["TURN", "XYZZY", "MAILFROM:<a@b.c>", "", "  ", "HELOO x", "\x00"],
)
def test_unknown_verbs_get_500_5_5_1(line: str) -> None:
    s = Session()
    assert codes(s.send(line + "\r\n")) == ["500 5.5.1"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("HELO", "501 5.5.2"),
        ("EHLO", "501 5.5.2"),
        ("EHLO two names", "501 5.5.2"),
        ("EHLO bad_label-.example", "501 5.5.2"),
        ("EHLO [300.1.1.1]", "501 5.5.2"),
        ("EHLO [IPv6:::zz]", "501 5.5.2"),
        ("RSET now", "501 5.5.2"),
        ("QUIT now", "501 5.5.2"),
        ("VRFY", "501 5.5.2"),
    ],
)
def test_known_verb_bad_arguments_get_501(line: str, expected: str) -> None:
    s = Session()
    assert codes(s.send(line + "\r\n")) == [expected]


@pytest.mark.parametrize(
    "name", ["client.example.net", "[192.0.2.1]", "[IPv6:2001:db8::1]", "host_with_underscore"]
)
def test_helo_names_accepted(name: str) -> None:
    s = Session()
    assert s.send(f"EHLO {name}\r\n")[0].startswith("250-")


def test_ipv6_helo_literal_is_canonicalised() -> None:
    s = Session()
    s.send("EHLO [IPv6:2001:DB8:0:0:0:0:0:1]\r\n")
    assert s.of(ev.Helo)[0].name == "[IPv6:2001:db8::1]"


MAIL_OK = [
    ("<a@example.net>", Address("a", "example.net")),
    ("<>", Address("", "")),
    ("<@relay.example,@[192.0.2.7]:joe@example.net>", Address("joe", "example.net")),
    ('<"john smith"@example.net>', Address("john smith", "example.net", True)),
    ('<"jo\\"e"@example.net>', Address('jo"e', "example.net", True)),
    ('<"joe"@example.net>', Address("joe", "example.net")),  # one canonical form
    ("<joe@[192.0.2.1]>", Address("joe", "[192.0.2.1]")),
    ("<joe@[IPv6:2001:db8::1]>", Address("joe", "[IPv6:2001:db8::1]")),
    ("<joe@[IPv6:2001:0db8:0000::0001]>", Address("joe", "[IPv6:2001:db8::1]")),
    ("<x!#$%&'*+/=?^_`{|}~-y@example.net>", Address("x!#$%&'*+/=?^_`{|}~-y", "example.net")),
]
# upas's loopback literal: a recipient's form only (below)
LOOPBACK = ("<joe@[]>", Address("joe", "[]"))


@pytest.mark.parametrize(("path", "address"), MAIL_OK)
def test_mail_paths(path: str, address: Address) -> None:
    s = Session()
    s.ehlo()
    out = s.send(f"MAIL FROM:{path}\r\n")
    assert codes(out) == ["250 2.1.0"], out
    assert s.conn.envelope is not None
    assert s.conn.envelope.sender == address


def test_the_empty_literal_is_no_sender() -> None:
    # RFC 5321 4.1.3 has no empty address literal; upas's "[]" names this host for
    # a recipient, and as a sender nobody a reply could reach
    s = Session()
    s.ehlo()
    assert codes(s.send("MAIL FROM:<joe@[]>\r\n")) == ["501 5.1.7"]


@pytest.mark.parametrize(("path", "address"), [*MAIL_OK[2:], LOOPBACK])
def test_rcpt_paths(path: str, address: Address) -> None:
    s = Session()
    s.transaction("<a@example.net>", path)
    assert s.of(ev.RcptTo)[-1].recipient.address == address


def test_source_route_is_dropped_from_the_recipient() -> None:
    s = Session()
    s.transaction("<a@example.net>", "<@hop1.example,@hop2.example:bob@example.org>")
    assert str(s.conn.envelope.recipients[0].address) == "bob@example.org"


def test_postmaster_without_domain_is_a_recipient() -> None:
    s = Session()
    s.transaction("<a@example.net>", "<Postmaster>")
    assert s.conn.envelope.recipients[0].address == Address("postmaster", "")


def test_space_after_colon_is_tolerated() -> None:
    s = Session()
    s.ehlo()
    assert codes(s.send("MAIL FROM: <a@example.net>\r\n")) == ["250 2.1.0"]


@pytest.mark.parametrize(
    "path",
    [
        "a@example.net",  # no angle brackets
        "<a@example.net",
        "<a.@example.net>",
        "<a..b@example.net>",
        "<a@>",
        "<@example.net>",
        "<a@-bad.example>",
        "<a@[300.0.0.1]>",
        "<a@[IPv6:nope]>",
        '<"unterminated@example.net>',
        "<@hop.example:>",
        "<@hop.example,bad:a@example.net>",
        "<" + "x" * 65 + "@example.net>",  # local part over 64 octets
        "<a@" + ("d" * 60 + ".") * 5 + "net>",  # path over 256 octets
        "<a@example.net>junk",
    ],
)
def test_bad_sender_syntax(path: str) -> None:
    s = Session()
    s.ehlo()
    out = s.send(f"MAIL FROM:{path}\r\n")
    assert codes(out)[0] in ("501 5.1.7", "501 5.5.2"), out
    assert s.conn.envelope is None


def test_bad_sender_path_is_5_1_7_and_bad_recipient_is_5_1_3() -> None:
    s = Session()
    s.ehlo()
    assert codes(s.send("MAIL FROM:<a..b@example.net>\r\n")) == ["501 5.1.7"]
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert codes(s.send("RCPT TO:<b..c@example.org>\r\n")) == ["501 5.1.3"]
    assert codes(s.send("RCPT TO:<>\r\n")) == ["501 5.1.3"]


def test_missing_from_or_to_is_501_5_5_2() -> None:
    s = Session()
    s.ehlo()
    assert codes(s.send("MAIL <a@example.net>\r\n")) == ["501 5.5.2"]
    assert codes(s.send("MAIL TO:<a@example.net>\r\n")) == ["501 5.5.2"]
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert codes(s.send("RCPT <b@example.org>\r\n")) == ["501 5.5.2"]


@pytest.mark.parametrize(
    "params", ["FOO=BAR", "XFORWARD=1", "SIZE=1 X-UNKNOWN", "BINARY"]
)
def test_unknown_mail_parameters_get_555(params: str) -> None:
    s = Session()
    s.ehlo()
    assert codes(s.send(f"MAIL FROM:<a@example.net> {params}\r\n")) == ["555 5.5.4"]


def test_unknown_rcpt_parameter_gets_555() -> None:
    s = Session()
    s.transaction()
    assert codes(s.send("RCPT TO:<c@example.org> FOO=1\r\n")) == ["555 5.5.4"]


def test_parameters_after_plain_helo_are_unsupported() -> None:
    s = Session()
    s.send("HELO client.example.net\r\n")
    assert codes(s.send("MAIL FROM:<a@example.net> SIZE=10\r\n")) == ["555 5.5.4"]


def test_noop_help_quit() -> None:
    s = Session()
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]
    assert codes(s.send("NOOP anything at all\r\n")) == ["250 2.0.0"]
    help_lines = s.send("HELP\r\n")
    assert all(line.startswith(("214-2.0.0 ", "214 2.0.0 ")) for line in help_lines)
    assert codes(s.send("HELP MAIL\r\n")) == ["214 2.0.0"]
    # STARTTLS and AUTH only where the listener offers them (else they answer 502)
    assert "STARTTLS" not in help_lines[0] and "AUTH" not in help_lines[0]
    offering = Session(starttls=True, auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    assert offering.send("HELP\r\n")[0].endswith(" HELP STARTTLS AUTH")
    assert s.send("QUIT\r\n") == [f"221 2.0.0 {HOST} Service closing transmission channel"]
    assert s.conn.closed
    assert isinstance(s.events[-1], ev.Closed)
    assert s.send("NOOP\r\n") == []  # nothing after QUIT


def test_vrfy_without_verification_is_252() -> None:
    s = Session()
    assert codes(s.send("VRFY joe@example.org\r\n")) == ["252 2.5.0"]
    assert not s.of(ev.Verify)


def test_vrfy_with_verification_is_a_decision() -> None:
    s = Session(vrfy=True)
    assert codes(s.send("VRFY <joe@example.org>\r\n")) == ["250 2.1.5"]
    assert s.of(ev.Verify) == [ev.Verify(Address("joe", "example.org"))]
    refuse = scripted(Verify=reply("vrfy.unknown", address="nobody@example.org"))
    s = Session(vrfy=True, decide=refuse)
    assert codes(s.send("VRFY nobody@example.org\r\n")) == ["550 5.1.1"]
    assert codes(s.send("VRFY <bad..addr@example.org>\r\n")) == ["501 5.1.3"]


def test_vrfy_takes_a_bare_user_name() -> None:
    s = Session(vrfy=True)
    assert codes(s.send("VRFY joe\r\n")) == ["250 2.1.5"]
    assert s.of(ev.Verify) == [ev.Verify(Address("joe", ""))]
    assert codes(s.send("VRFY jo..e\r\n")) == ["501 5.1.3"]
    assert codes(s.send("VRFY " + "j" * 65 + "\r\n")) == ["501 5.1.3"]


def test_vrfy_takes_the_smtputf8_parameter() -> None:
    # RFC 6531 3.7.4.2: VRFY String [SP SMTPUTF8]; UTF-8 without it is 550 5.6.8,
    # not echoed
    s = Session(vrfy=True)
    assert codes(s.send("VRFY j\u00f6rg@example.org\r\n")) == ["550 5.6.8"]
    assert codes(s.send("VRFY j\u00f6rg@example.org SMTPUTF8\r\n")) == ["250 2.1.5"]
    assert codes(s.send("VRFY joe smtputf8\r\n")) == ["250 2.1.5"]
    assert s.of(ev.Verify) == [ev.Verify(Address("j\u00f6rg", "example.org")),
                               ev.Verify(Address("joe", ""))]


def test_expn_is_refused() -> None:
    s = Session()
    assert codes(s.send("EXPN staff\r\n")) == ["502 5.5.1"]


def test_starttls_not_configured_is_502() -> None:
    s = Session()
    s.ehlo()
    assert codes(s.send("STARTTLS\r\n")) == ["502 5.5.1"]


def test_auth_not_configured_is_502() -> None:
    s = Session()
    s.ehlo()
    assert codes(s.send("AUTH PLAIN\r\n")) == ["502 5.5.1"]


def test_every_reply_here_is_well_formed() -> None:
    s = Session(vrfy=True)
    for line in [
        "HELO x.example", "EHLO x.example", "MAIL FROM:<a@b.example> SIZE=5 BODY=8BITMIME",
        "RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE", "VRFY c@d.example", "EXPN x",
        "HELP", "TURN", "RSET", "STARTTLS", "AUTH LOGIN", "NOOP", "DATA", "QUIT",
    ]:
        s.feed(line + "\r\n")
    well_formed(s.greeting)
    for out in s.writes:
        well_formed(out)
