"""Corners of the RFC 5321 4.1.2/4.1.3 grammar: address literals, quoted local parts,
invalid character codes."""

from __future__ import annotations

import pytest
from protocol_helpers import Session, codes

from mailgate.protocol import events as ev


def rcpt(path: str) -> tuple[list[str], ev.Event | None]:
    s = Session()
    s.transaction()
    out = codes(s.send(f"RCPT TO:{path}\r\n"))
    accepted = s.of(ev.RcptTo)[1:]
    return out, accepted[0] if accepted else None


@pytest.mark.parametrize(
    ("literal", "stored"),
    [
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("[IPv6:1:2:3:4:5:6::]", "[IPv6:1:2:3:4:5:6::]"),  # "::" for two groups
        ("[IPv6:1:2:3:4::1.2.3.4]", "[IPv6:1:2:3:4::102:304]"),
        # RFC 5952 5: an IPv4-mapped address keeps its dotted quad
        ("[IPv6:::ffff:127.0.0.1]", "[IPv6:::ffff:127.0.0.1]"),
        ("[IPv6:::FFFF:7f00:1]", "[IPv6:::ffff:127.0.0.1]"),
        ("[001.002.003.004]", "[1.2.3.4]"),  # Snum = 1*3DIGIT: leading zeros are decimal
    ],
)
def test_address_literals_the_grammar_allows(literal: str, stored: str) -> None:
    out, event = rcpt(f"<u@{literal}>")
    assert out == ["250 2.1.5"]
    assert event is not None and event.recipient.address.domain == stored  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "literal",
    [
        "[IPv6:fe80::1%eth0]",  # no zone index in IPv6-addr
        "[IPv6:fe80::1%25]",
        "[IPv6:1:2:3:4:5:6:7::]",  # "::" stands for at least two groups
        "[IPv6:1:2:3:4:5::1.2.3.4]",  # at most four groups beside "::" and an IPv4 part
        "[256.1.1.1]",
        "[1.2.3]",
        "[1.2.3.0004]",
    ],
)
def test_address_literals_the_grammar_refuses(literal: str) -> None:
    assert rcpt(f"<u@{literal}>")[0] == ["501 5.1.3"]


def test_helo_needs_a_real_address_literal() -> None:
    s = Session()
    assert codes(s.send("EHLO []\r\n")) == ["501 5.5.2"]  # upas's [] is for RCPT only
    assert codes(s.send("EHLO [IPv6:fe80::1%25]\r\n")) == ["501 5.5.2"]
    assert s.send("EHLO [192.0.2.1]\r\n")[-1].startswith("250 ")


def test_an_empty_quoted_local_part_is_syntax_the_policy_judges() -> None:
    # RFC 5321 4.1.2: Quoted-string = DQUOTE *QcontentSMTP DQUOTE
    out, event = rcpt('<""@example.org>')
    assert out == ["250 2.1.5"]
    assert event is not None
    assert str(event.recipient.address) == '""@example.org'  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"EHLO \xe9.example\r\n", "501 5.5.2"),
        (b"MAIL FROM:<\xe9@example.net>\r\n", "501 5.5.2"),
        (b"mail FROM:<\xe9@example.net>\r\n", "501 5.5.2"),
        (b"NOOP \xff\r\n", "501 5.5.2"),
        (b"FR\xe9D x\r\n", "500 5.5.2"),  # no command of ours: unrecognized
    ],
)
def test_invalid_character_codes_in_a_known_command_are_501(line: bytes, code: str) -> None:
    # RFC 5321 4.1.2: such a command MUST be rejected with 501; 500 is for a command
    # not recognized
    s = Session()
    if not line.startswith(b"EHLO"):
        s.ehlo()
    assert codes(s.send(line)) == [code]


@pytest.mark.parametrize("digits", ["\u00b2", "\u0663", "1\u0663"])
def test_sizes_are_ascii_digits(digits: str) -> None:
    # str.isdigit() takes "²" and "٣": int() then raised (the session died with 421),
    # or BDAT read 3 octets as data where a strict reader sees a command
    s = Session()
    s.ehlo()
    assert codes(s.send(f"MAIL FROM:<a@example.net> SIZE={digits}\r\n")) == ["501 5.5.4"]
    s.transaction()
    assert codes(s.send(f"BDAT {digits} LAST\r\nabcNOOP\r\n")) == ["501 5.5.2", "500 5.5.1"]
    assert not s.of(ev.BodyChunk)


def test_auth_after_helo_says_it_needs_ehlo() -> None:
    s = Session(auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    s.send("HELO client.example.net\r\n")
    assert s.send("AUTH PLAIN\r\n") == ["503 5.5.1 AUTH needs EHLO, not HELO"]


def test_auth_before_any_greeting_asks_for_one() -> None:
    s = Session(auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    assert s.send("AUTH PLAIN\r\n") == ["503 5.5.1 Say EHLO first: AUTH is an ESMTP extension"]
