"""Item 4 (part): SIZE (RFC 1870), BODY (RFC 6152 / 3030), SMTPUTF8 (RFC 6531),
DSN (RFC 3461) as the engine parses and keeps them."""

from __future__ import annotations

import pytest
from protocol_helpers import Session, codes

from mailgate.protocol import events as ev


def mail(s: Session, params: str, path: str = "<a@example.net>") -> list[str]:
    if s.conn.helo is None:
        s.ehlo()
    return codes(s.send(f"MAIL FROM:{path} {params}\r\n"))


# --- SIZE ---------------------------------------------------------------------


def test_declared_size_within_and_over_the_limit() -> None:
    s = Session(max_message_size=1000)
    assert mail(s, "SIZE=1000") == ["250 2.1.0"]
    assert s.conn.envelope.declared_size == 1000
    s.send("RSET\r\n")
    assert mail(s, "SIZE=1001") == ["552 5.3.4"]
    assert s.conn.envelope is None
    assert not [e for e in s.of(ev.MailFrom) if e.envelope.declared_size == 1001]


@pytest.mark.parametrize("value", ["SIZE", "SIZE=", "SIZE=-1", "SIZE=1e3", "SIZE=" + "9" * 21])
def test_bad_size_values(value: str) -> None:
    s = Session()
    assert mail(s, value)[0].startswith("501 ")


def test_actual_size_over_the_limit_after_data() -> None:
    s = Session(max_message_size=100)
    s.transaction()
    s.send("DATA\r\n")
    out = s.send(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\nNOOP\r\n")
    assert codes(out) == ["552 5.3.4", "250 2.0.0"]
    assert not s.of(ev.MessageEnd)
    aborted = s.of(ev.MessageAborted)
    assert len(aborted) == 1 and aborted[0].reply.code == 552
    assert s.conn.envelope is None and not s.conn.closed


def test_size_exactly_at_the_limit_is_accepted() -> None:
    s = Session(max_message_size=12)
    s.transaction()
    s.send("DATA\r\n")
    assert codes(s.send(b"0123456789\r\n.\r\n")) == ["250 2.0.0"]
    assert s.of(ev.MessageEnd)[0].size == 12


# --- BODY -----------------------------------------------------------------------


@pytest.mark.parametrize("body", ["7BIT", "8BITMIME", "8bitmime", "BINARYMIME"])
def test_body_values_kept(body: str) -> None:
    s = Session()
    assert mail(s, f"BODY={body}") == ["250 2.1.0"]
    assert s.conn.envelope.body == body.upper()


@pytest.mark.parametrize("value", ["BODY", "BODY=9BIT", "BODY=8BITMIME BODY=7BIT"])
def test_bad_body_values(value: str) -> None:
    s = Session()
    assert mail(s, value) == ["501 5.5.4"]


def test_binarymime_requires_bdat() -> None:
    s = Session()
    mail(s, "BODY=BINARYMIME")
    s.send("RCPT TO:<b@example.org>\r\n")
    assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]
    assert not s.of(ev.DataStart)
    assert codes(s.send(b"BDAT 3 LAST\r\n\x00\xff\x01")) == ["250 2.0.0"]
    assert s.body() == b"\x00\xff\x01"


# --- SMTPUTF8 -------------------------------------------------------------------


def test_utf8_addresses_need_the_smtputf8_parameter() -> None:
    # RFC 6531 3.5: 550 to a MAIL that needs an ASCII address (553 to a RCPT)
    s = Session()
    assert mail(s, "", path="<j\u00f6rg@b\u00fccher.example>") == ["550 5.6.7"]
    assert mail(s, "SMTPUTF8", path="<j\u00f6rg@b\u00fccher.example>") == ["250 2.1.0"]
    env = s.conn.envelope
    assert env.smtputf8 and env.sender.local == "j\u00f6rg"
    assert codes(s.send("RCPT TO:<\u7528\u6237@\u4f8b\u5b50.example>\r\n")) == ["250 2.1.5"]


def test_utf8_recipient_without_smtputf8_is_553() -> None:
    s = Session()
    s.transaction()
    assert codes(s.send("RCPT TO:<j\u00f6rg@example.org>\r\n")) == ["553 5.6.7"]


def test_a_quoted_local_part_is_ascii_without_smtputf8() -> None:
    # RFC 5321 4.1.2 qtextSMTP and quoted-pairSMTP are ASCII; RFC 6531 3.3 adds UTF-8
    # only for SMTPUTF8 transactions
    s = Session()
    for path in ('<"\u00e9"@b.example>', '<"j\\\u00f6rg"@b.example>'):
        assert mail(s, "", path=path) == ["550 5.6.7"], path
    assert mail(s, "SMTPUTF8", path='<"\u00e9 x"@b.example>') == ["250 2.1.0"]
    s = Session()
    s.transaction()
    assert codes(s.send('RCPT TO:<"j\u00f6rg"@example.org>\r\n')) == ["553 5.6.7"]


def test_smtputf8_takes_no_value() -> None:
    s = Session()
    assert mail(s, "SMTPUTF8=yes") == ["501 5.5.4"]


# --- DSN ------------------------------------------------------------------------


def test_dsn_parameters_are_parsed_and_kept() -> None:
    s = Session()
    assert mail(s, "RET=HDRS ENVID=QQ+2B314") == ["250 2.1.0"]
    env = s.conn.envelope
    assert env.ret == "HDRS" and env.envid == "QQ+314"
    out = s.send("RCPT TO:<b@example.org> NOTIFY=success,delay ORCPT=rfc822;b+40example.org\r\n")
    assert codes(out) == ["250 2.1.5"]
    rcpt = env.recipients[0]
    assert rcpt.notify == ("SUCCESS", "DELAY")
    assert rcpt.orcpt == "rfc822;b@example.org"
    assert codes(s.send("RCPT TO:<c@example.org> NOTIFY=NEVER\r\n")) == ["250 2.1.5"]
    assert env.recipients[1].notify == ("NEVER",)


@pytest.mark.parametrize(
    "param",
    ["RET=ALL", "RET", "ENVID", "ENVID=a+zz", "ENVID=" + "x" * 101, "RET=FULL RET=HDRS",
     # RFC 3461 4.4: an envelope id is printable US-ASCII before its xtext encoding
     "ENVID=abc+FF", "ENVID=abc+0D+0A", "AUTH=joe+00"],
)
def test_bad_mail_dsn_parameters(param: str) -> None:
    s = Session(auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    assert mail(s, param) == ["501 5.5.4"]


@pytest.mark.parametrize(
    "param",
    ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "NOTIFY", "NOTIFY=SUCCESS,SUCCESS",
     "ORCPT=rfc822", "ORCPT=;x@y", "ORCPT=rfc822;a+zzb", "ORCPT",
     # RFC 3461 4.2: printable US-ASCII once decoded; RFC 6533 3: raw UTF-8 in a utf-8
     # address only with SMTPUTF8
     "ORCPT=rfc822;u+00@d.org", "ORCPT=rfc822;a+0D+0AX:+20y@c", "ORCPT=rfc822;j+C3+B6@d.org",
     "ORCPT=utf-8;j\u00f6rg@d.org",
     # RFC 6533 3: a utf-8 address has no xtext "+XX", and "\" only as \x{HEX}
     "ORCPT=utf-8;a+2Bb@d.org", "ORCPT=utf-8;a=b@d.org", "ORCPT=utf-8;a\\b@d.org",
     "ORCPT=utf-8;a\\x{zz}@d.org",
     # RFC 6533 3: HEXPOINT is a Unicode scalar value
     "ORCPT=utf-8;j\\x{D800}rg@d.org", "ORCPT=utf-8;j\\x{110000}rg@d.org"],
)
def test_bad_rcpt_dsn_parameters(param: str) -> None:
    s = Session()
    s.transaction()
    assert codes(s.send(f"RCPT TO:<c@example.org> {param}\r\n")) == ["501 5.5.4"]
    assert len(s.conn.envelope.recipients) == 1


def test_a_raw_utf8_original_recipient_with_smtputf8() -> None:
    s = Session()
    assert mail(s, "SMTPUTF8") == ["250 2.1.0"]
    out = s.send("RCPT TO:<c@example.org> ORCPT=utf-8;j\u00f6rg@d.org\r\n")
    assert codes(out) == ["250 2.1.5"]
    assert s.conn.envelope.recipients[0].orcpt == "utf-8;j\u00f6rg@d.org"
    # and its 7-bit form, with or without SMTPUTF8
    out = s.send("RCPT TO:<c@example.org> ORCPT=utf-8;j\\x{F6}rg@d.org\r\n")
    assert codes(out) == ["250 2.1.5"]


def test_auth_mail_parameter_is_xtext() -> None:
    s = Session(auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    assert mail(s, "AUTH=joe+40example.net") == ["250 2.1.0"]
    assert s.conn.envelope.auth == "joe@example.net"


def test_the_auth_mail_parameter_needs_auth_offered() -> None:
    # RFC 4954 5 defines it for a server that offers AUTH; elsewhere it is as
    # unknown as any other parameter (RFC 5321 4.1.1.11)
    assert mail(Session(), "AUTH=<>") == ["555 5.5.4"]


def test_a_parameter_given_twice_is_named_so() -> None:
    s = Session()
    s.ehlo()
    out = s.send("MAIL FROM:<a@example.net> SIZE=1 SIZE=2\r\n")
    assert out == ["501 5.5.4 Duplicate parameter SIZE"]
