"""Received: (RFC 5321 4.4) and Return-Path: exactly as mailgate writes them."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
from datetime import datetime, timedelta, timezone

import pytest
from delivery_helpers import envelope

from mailgate.delivery.base import TraceInfo
from mailgate.delivery.trace import protocol_name, received_header, return_path_header
from mailgate.protocol.envelope import NULL_ADDRESS, Address, Recipient

WHEN = datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=2)))


def trace(**changes: object) -> TraceInfo:
    base = dict(
        session_id="7Hq2xK",
        helo="mail.example.net",
        client_ip="192.0.2.7",
        reverse_name="mail.example.net",
        hostname="mx.example.org",
        protocol="ESMTP",
    )
    base.update(changes)
    return TraceInfo(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extended", "tls", "auth", "utf8", "name"),
    [
        (False, False, False, False, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, True, False, False, "ESMTPS"),
        (True, False, True, False, "ESMTPA"),
        (True, True, True, False, "ESMTPSA"),
        (True, False, False, True, "UTF8SMTP"),
        (True, True, False, True, "UTF8SMTPS"),
        (True, False, True, True, "UTF8SMTPA"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_protocol_names_follow_rfc3848_and_rfc6531(
    extended: bool, tls: bool, auth: bool, utf8: bool, name: str
) -> None:
    assert protocol_name(extended, tls, auth, utf8) == name


def test_received_with_one_recipient_has_a_for_clause() -> None:
    header = received_header(trace(), envelope("alice@example.org"), WHEN)
    assert header == (
        b"Received: from mail.example.net (mail.example.net [192.0.2.7])\r\n"
        b"\tby mx.example.org with ESMTP id 7Hq2xK for <alice@example.org>;\r\n"
        b"\tTue, 05 Mar 2024 14:07:09 +0200\r\n"
    )


def test_u_label_names_are_written_as_a_labels() -> None:
    # EHLO bücher.example, then mail without SMTPUTF8: its header must stay ASCII
    # (RFC 6532 is for SMTPUTF8 mail only), and an SMTPUTF8 message whose own fields
    # are ASCII must not seem to carry UTF-8 because of ours: a next hop without
    # SMTPUTF8 would refuse it (554 5.6.9), though it may take the message.
    plain = envelope("alice@example.org")
    header = received_header(trace(helo="bücher.example"), plain, WHEN)
    assert header.isascii() and b"from xn--bcher-kva.example " in header
    utf8 = envelope("x@bücher-relay.example")
    utf8.smtputf8 = True
    header = received_header(trace(helo="bücher.example", protocol="UTF8SMTP"), utf8, WHEN)
    assert header.isascii() and b"from xn--bcher-kva.example " in header
    assert b"for <x@xn--bcher-relay-thb.example>;" in header
    # a UTF-8 local part has no ASCII form: it stays (such a message needs SMTPUTF8)
    local = envelope("jörg@example.org")
    local.smtputf8 = True
    header = received_header(trace(protocol="UTF8SMTP"), local, WHEN)
    assert "for <jörg@example.org>;".encode() in header


def test_received_with_tls_names_version_and_cipher_in_a_comment() -> None:
    info = trace(
        protocol="ESMTPS",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        reverse_name=None,
    )
    header = received_header(info, envelope("a@example.org", "b@example.org"), WHEN)
    assert header == (
        b"Received: from mail.example.net (unknown [192.0.2.7])\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384) by mx.example.org\r\n"
        b"\twith ESMTPS id 7Hq2xK; Tue, 05 Mar 2024 14:07:09 +0200\r\n"
    )


def test_received_writes_ipv6_as_an_address_literal() -> None:
    header = received_header(trace(client_ip="2001:db8::1"), envelope("a@b.example"), WHEN)
    assert b"(mail.example.net [IPv6:2001:db8::1])" in header


def test_received_without_recipients_or_date_still_parses() -> None:
    header = received_header(trace(), envelope())
    assert b" for " not in header
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(header + b"\r\n")
    value = " ".join(str(msg["Received"]).split())  # unfolded
    assert value.startswith("from mail.example.net (mail.example.net [192.0.2.7]) by")
    # the date after the semicolon is an RFC 5322 date-time
    date = email.utils.parsedate_to_datetime(value.rsplit(";", 1)[1].strip())
    assert date.tzinfo is not None


@pytest.mark.parametrize(
    "helo",
    [
        "evil\r\nX-Injected: yes",
        "evil\nX-Injected: yes",
        "evil\rX-Injected: yes",
        "a) (b [1.2.3.4]",
        "x" * 5000,
        "",
    ],
)
def test_client_values_cannot_inject_lines_or_exceed_998(helo: str) -> None:
    info = trace(helo=helo, reverse_name="r\r\nX-Bad: 1", session_id="id\r\nX-Id: 2")
    rcpt = Address("we\r\nird", "example.org")
    env = envelope()
    env.recipients = [Recipient(rcpt)]
    header = received_header(info, env, WHEN)
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    body = lines[:-1]
    assert body[0].startswith(b"Received: from ")
    assert all(line.startswith(b"\t") for line in body[1:])
    assert b"\r" not in b"".join(body) and b"\n" not in b"".join(body)
    assert all(len(line) <= 998 for line in body)
    # the comment stays balanced: one "(" and one ")" for the TCP-info
    first = body[0].decode()
    assert first.count("(") == first.count(")")


def test_lines_stay_under_78_when_values_are_normal() -> None:
    info = trace(
        protocol="ESMTPSA",
        tls_version="TLSv1.2",
        tls_cipher="ECDHE-RSA-AES256-GCM-SHA384",
        helo="a-rather-long-client-name.mail.example.net",
        reverse_name="a-rather-long-client-name.mail.example.net",
    )
    header = received_header(info, envelope("some.recipient@example.org"), WHEN)
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    assert header.count(b"\r\n") > 2  # it did fold


def test_return_path_for_sender_and_null_sender() -> None:
    assert return_path_header(envelope()) == b"Return-Path: <sender@example.net>\r\n"
    assert return_path_header(envelope(sender=NULL_ADDRESS)) == b"Return-Path: <>\r\n"
    assert return_path_header(envelope(sender=None)) == b"Return-Path: <>\r\n"
    evil = envelope(sender=Address("a\r\nX-Bad: 1", "example.net"))
    assert return_path_header(evil).count(b"\r\n") == 1


def test_messages_of_one_session_keep_their_own_id_and_recipient() -> None:
    # the clauses before "id" are shared between messages; the rest must not leak
    first = received_header(trace(session_id="S1.1"), envelope("a@example.org"), WHEN)
    second = received_header(trace(session_id="S1.2"), envelope("b@example.org"), WHEN)
    third = received_header(trace(session_id="S1.3"), envelope("c@x.org", "d@x.org"), WHEN)
    assert b"id S1.1" in first and b"<a@example.org>" in first
    assert b"id S1.2" in second and b"<b@example.org>" in second and b"S1.1" not in second
    assert b"id S1.3;" in third and b"for <" not in third
    assert first.split(b" id ")[0] == second.split(b" id ")[0] == third.split(b" id ")[0]
    other = received_header(trace(session_id="S1.1", helo="other.example.net"), envelope(), WHEN)
    assert b"from other.example.net" in other
