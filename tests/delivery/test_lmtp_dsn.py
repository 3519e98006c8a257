"""A downstream refusal after the data becomes a RFC 3464 report to the sender."""

from __future__ import annotations

import asyncio
import email
import email.policy
from dataclasses import dataclass
from pathlib import Path

from dovecot_fixture import DOMAIN, Dovecot, dovecot_server  # noqa: F401  (the fixture)

from mailgate.config.delivery import LMTPConfig
from mailgate.delivery.base import RecipientResult, TraceInfo
from mailgate.delivery.dsn import (
    RETURN_LIMIT,
    bounce_envelope,
    bounce_recipients,
    build_dsn,
    for_report,
    header_section,
    read_returned,
)
from mailgate.delivery.lmtp import LMTPDestination
from mailgate.protocol.envelope import NULL_ADDRESS, Address, Envelope, Recipient
from mailgate.protocol.replies import reply

TRACE = TraceInfo("dsn1", "client.test", "192.0.2.1", None, "mx.test", "ESMTP")
MESSAGE = b"Received: from client.test\r\nSubject: quarterly report\r\n\r\nthe body\r\n"


@dataclass
class Spooled:
    path: str
    size: int
    no_bare_cr: bool = False  # as for BDAT data: line ends made CRLF on the wire


def write_spool(path: Path, data: bytes) -> Spooled:
    path.write_bytes(data)
    return Spooled(str(path), len(data))


def test_refused_recipient_is_reported_to_the_sender(dovecot: Dovecot, tmp_path: Path) -> None:
    rcpts = [
        Recipient(Address("nosuchuser", DOMAIN), orcpt="rfc822;Nosuchuser@example.test"),
        Recipient(Address("bob", DOMAIN)),
        Recipient(Address("ghost", DOMAIN), notify=("NEVER",)),
    ]
    env = Envelope(sender=Address("alice", DOMAIN), recipients=rcpts, envid="env-1")
    dest = LMTPDestination(LMTPConfig(dovecot.address), "mx.test")
    spool = write_spool(tmp_path / "msg.spool", MESSAGE)
    results = asyncio.run(dest.deliver(env, TRACE, spool, rcpts))
    assert [r.ok for r in results] == [False, True, False]

    failed = bounce_recipients(results)
    assert [r.recipient for r in failed] == [rcpts[0]]  # NOTIFY=NEVER is not reported
    headers, _ = asyncio.run(read_returned(spool.path, None))
    assert headers == MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"
    report = build_dsn(
        envelope=env, failed=failed, reporting_mta="mx.test", original_headers=headers
    )

    # The report goes from <> back to the sender, through the same destination.
    benv = bounce_envelope(env)
    assert benv is not None and benv.sender == NULL_ADDRESS
    back = asyncio.run(
        dest.deliver(benv, TRACE, write_spool(tmp_path / "dsn.spool", report), benv.recipients)
    )
    assert [r.reply.code for r in back] == [250]
    (stored,) = dovecot.maildir_messages("alice")
    assert stored.startswith(b"Return-Path: <>\n")

    msg = email.message_from_bytes(report, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "alice@example.test" and msg["Auto-Submitted"] == "auto-replied"
    human, status, original = msg.get_payload()
    assert "nosuchuser@example.test" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "env-1"
    assert per_rcpt["Final-Recipient"] == "rfc822; nosuchuser@example.test"
    assert per_rcpt["Original-Recipient"] == "rfc822;Nosuchuser@example.test"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    # RFC 3464 2.3.5-6: the MTA that refused, and its reply as it gave it
    assert per_rcpt["Remote-MTA"] == f"dns; {dovecot.greeting_name}"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 ")
    assert "User doesn't exist" in per_rcpt["Diagnostic-Code"]
    assert "downstream said" not in per_rcpt["Diagnostic-Code"]
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"Subject: quarterly report" in original.get_payload(decode=True)


def test_null_sender_gets_no_bounce() -> None:
    assert bounce_envelope(Envelope(sender=NULL_ADDRESS)) is None
    assert bounce_envelope(Envelope(sender=None)) is None


def test_temporary_failures_are_reported_with_their_status() -> None:
    r = RecipientResult(Recipient(Address("x", DOMAIN)), reply("delivery.downstream_temp"))
    env = Envelope(sender=Address("s", DOMAIN))
    report = build_dsn(envelope=env, failed=[r], reporting_mta="mx.test", original_headers=b"")
    msg = email.message_from_bytes(report, policy=email.policy.default)
    per_rcpt = msg.get_payload()[1].get_payload()[1]
    assert per_rcpt["Status"] == "4.4.0"


def test_utf8_headers_of_smtputf8_mail_are_global_headers_and_the_report_8bitmime() -> None:
    # RFC 6533 3.5: UTF-8 header fields are quoted as message/global-headers; RFC 6152:
    # a report with 8-bit octets is sent BODY=8BITMIME
    r = RecipientResult(Recipient(Address("x", DOMAIN)), reply("delivery.downstream_temp"))
    headers = "Subject: caf\u00e9\r\n".encode()
    for smtputf8, kind in ((True, "message/global-headers"), (False, "text/rfc822-headers")):
        env = Envelope(sender=Address("s", DOMAIN), smtputf8=smtputf8)
        report = build_dsn(envelope=env, failed=[r], reporting_mta="mx.test",
                           original_headers=headers)
        msg = email.message_from_bytes(report, policy=email.policy.default)
        assert msg.get_payload()[2].get_content_type() == kind
        envelope = bounce_envelope(env)
        assert envelope is not None and for_report(envelope, report).body == "8BITMIME"
    plain = build_dsn(envelope=Envelope(sender=Address("s", DOMAIN)), failed=[r],
                      reporting_mta="mx.test", original_headers=b"Subject: hi\r\n")
    envelope = bounce_envelope(Envelope(sender=Address("s", DOMAIN)))
    assert envelope is not None and for_report(envelope, plain).body == "7BIT"


def test_line_breaks_of_a_utf8_sender_do_not_reach_the_report() -> None:
    # An SMTPUTF8 sender may hold NEL or U+2028, which many readers take for line
    # ends: the report's To: (and text) must not carry them raw.
    r = RecipientResult(Recipient(Address("x", DOMAIN)), reply("delivery.downstream_temp"))
    for breaker in ("\x85", "\u2028", "\u2029"):
        env = Envelope(sender=Address(f"j{breaker}rg", DOMAIN), smtputf8=True)
        report = build_dsn(envelope=env, failed=[r], reporting_mta="mx.test",
                           original_headers=b"")
        assert breaker.encode() not in report
        assert f"To: <j?rg@{DOMAIN}>".encode() in report


def test_header_limit_keeps_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"A: 1\r\nB: 22222\r\nC: 3\r\n\r\nbody")
    assert asyncio.run(read_returned(str(path), None, limit=12)) == (b"A: 1\r\n", False)
    path.write_bytes(b"no line end at all")
    assert asyncio.run(read_returned(str(path), None, limit=5)) == (b"", False)


def test_the_quoted_header_of_bdat_mail_is_the_header_only() -> None:
    # BDAT keeps bare-LF line ends: the header ended at the first blank line, and the
    # body (here with a CRLF pair, a NUL and binary octets) must not be quoted as
    # "the header" (RET=HDRS; a report's text/rfc822-headers part is text lines)
    received = b"Received: from x by y; Thu, 26 Nov 2026 05:00:00 +0000\r\n"
    head = received + b"Subject: bin\nX-Odd: a\rb\x00c\n\n\x00\x01\xff\r\nSECRET\r\n\r\n"
    assert header_section(head) == received + b"Subject: bin\r\nX-Odd: a b?c\r\n"
    # a header longer than the limit: whole lines, whichever their ends
    assert header_section(b"A: 1\nB: 2\nC: th") == b"A: 1\r\nB: 2\r\n"


def test_a_utf8_orcpt_makes_the_status_global_and_8bit() -> None:
    # RFC 3464 2.1: message/delivery-status is 7-bit: a UTF-8 ORCPT of an ASCII
    # recipient needs RFC 6533's message/global-delivery-status, and every part with
    # 8-bit octets says so (RFC 2045)
    refused = reply("delivery.downstream_rcpt_perm")
    rcpt = Recipient(Address("x", DOMAIN), orcpt="utf-8;carl\u00f6@b\u00fccher.test")
    report = build_dsn(envelope=Envelope(sender=Address("s", DOMAIN)),
                       failed=[RecipientResult(rcpt, refused)], reporting_mta="mx.test",
                       original_headers=b"Subject: hi\r\n")
    msg = email.message_from_bytes(report, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    status = msg.get_payload()[1]
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    text = report.decode()
    assert "Final-Recipient: rfc822; x@" in text and "Original-Recipient: utf-8;carl" in text
    ascii_only = build_dsn(envelope=Envelope(sender=Address("s", DOMAIN)),
                           failed=[RecipientResult(Recipient(Address("x", DOMAIN)), refused)],
                           reporting_mta="mx.test", original_headers=b"Subject: hi\r\n")
    msg = email.message_from_bytes(ascii_only, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] is None
    assert msg.get_payload()[1].get_content_type() == "message/delivery-status"


def test_ret_full_returns_a_small_text_message_whole(tmp_path: Path) -> None:
    # RFC 3461 4.3: RET=FULL asks for the entire message in a failure report; it was
    # answered with the header only, whatever its size
    message = b"Received: x\r\nSubject: s\r\n\r\nthe body\r\n"
    path = tmp_path / "m"
    path.write_bytes(message)
    full = Envelope(sender=Address("s", DOMAIN), ret="FULL")
    assert asyncio.run(read_returned(str(path), full)) == (message, True)
    assert asyncio.run(read_returned(str(path), Envelope(sender=Address("s", DOMAIN)))) == (
        b"Received: x\r\nSubject: s\r\n", False)
    # too large, binary, or not text lines (BDAT with bare LF): the header
    for body, env in ((b"x" * RETURN_LIMIT, full),
                      (b"the body\r\n", Envelope(sender=Address("s", DOMAIN), ret="FULL",
                                                  body="BINARYMIME")),
                      (b"bare\nLF\r\n", full)):
        path.write_bytes(b"Subject: s\r\n\r\n" + body)
        assert asyncio.run(read_returned(str(path), env)) == (b"Subject: s\r\n", False)
    r = RecipientResult(Recipient(Address("x", DOMAIN)), reply("delivery.downstream_rcpt_perm"))
    report = build_dsn(envelope=full, failed=[r], reporting_mta="mx.test",
                       original_headers=message, whole_message=True)
    msg = email.message_from_bytes(report, policy=email.policy.default)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "s"
