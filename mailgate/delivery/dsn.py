"""RFC 3464 delivery status notifications: failures after the data, and successes
the sender asked for.

A failure report is used when a downstream (LMTP, smarthost, pipe run per recipient)
refuses some recipients but not all after the client was told the data went
through: the server answers 250 and the envelope sender gets this multipart/report
naming every failed recipient (see docs/delivery-lmtp.md).  mailgate has no queue,
so a temporary failure is reported as failed too, with its 4.x.x status.

A success report goes to the sender for the recipients given NOTIFY=SUCCESS (RFC 3461
5.2.2): "delivered" into a mailbox, "relayed" to an MTA without DSN, or "expanded"
by an alias.  A downstream that was handed NOTIFY itself reports, not us.

The report is ``multipart/report; report-type=delivery-status`` (RFC 6522) with a
human-readable part, the ``message/delivery-status`` part and the original header as
``text/rfc822-headers`` (``message/global-headers`` for UTF-8 fields of SMTPUTF8 mail,
RFC 6533), or with RET=FULL the whole message as ``message/rfc822`` when it is at
most RETURN_LIMIT octets of text lines (a larger or binary one by its header, as
Postfix's bounce_size_limit).  It is sent from the null sender (RFC 5321 6.1)
with ``Auto-Submitted: auto-replied`` (RFC 3834).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

from mailgate.delivery.base import RecipientResult
from mailgate.protocol.envelope import NULL_ADDRESS, Envelope, Recipient
from mailgate.protocol.headers import header_end

HEADER_LIMIT = 64 * 1024  # octets of the original header quoted in the report
# RET=FULL returns a message up to this size whole; a larger one by its header (a
# report the size of the message it reports on would double a mailbox's load)
RETURN_LIMIT = 100 * 1024
# C1 controls and U+2028/2029 too, as in Received: (delivery/trace.py): an SMTPUTF8
# address may carry them, and many readers take NEL or LINE SEPARATOR for a line end
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_FAILURE_SUBJECT = "Undelivered Mail Returned to Sender"
_SUCCESS_SUBJECT = "Successful Mail Delivery Report"


def bounce_recipients(results: list[RecipientResult]) -> list[RecipientResult]:
    """The failed results whose recipient asked to hear of failures (RFC 3461 4.1)."""
    return [
        r
        for r in results
        if not r.ok and (not r.recipient.notify or "FAILURE" in r.recipient.notify)
    ]


def success_recipients(results: list[RecipientResult]) -> list[RecipientResult]:
    """The successes the sender asked to hear of and that nobody further on reports."""
    return [r for r in results if r.ok and r.action and "SUCCESS" in r.recipient.notify]


def for_report(report_envelope: Envelope, report: bytes) -> Envelope:
    """The report's envelope as its content needs it: BODY=8BITMIME when the report
    holds 8-bit octets (a UTF-8 diagnostic or address, quoted 8-bit header fields):
    RFC 6152 has 8-bit content only in a transaction that declares it."""
    if not report.isascii():
        report_envelope.body = "8BITMIME"
    return report_envelope


def bounce_envelope(envelope: Envelope) -> Envelope | None:
    """The envelope of the report: from ``<>`` to the sender; None for the null sender."""
    sender = envelope.sender
    if sender is None or sender.is_null:
        return None  # never bounce a bounce
    return Envelope(sender=NULL_ADDRESS, recipients=[Recipient(sender)], smtputf8=envelope.smtputf8)


async def read_returned(
    spool_path: str, envelope: Envelope | None, limit: int = HEADER_LIMIT
) -> tuple[bytes, bool]:
    """What a failure report returns of the message, and whether it is the whole of
    it: with RET=FULL (RFC 3461 4.3) a message of at most RETURN_LIMIT octets that is
    text lines (CRLF only, no NUL: message/rfc822 content), else its header (up to
    its blank line, at most ``limit`` octets of it)."""
    whole = envelope is not None and envelope.ret == "FULL" and envelope.body != "BINARYMIME"

    def read() -> bytes:
        with open(spool_path, "rb") as f:
            return f.read(max(limit, RETURN_LIMIT + 1 if whole else 0))

    data = await asyncio.to_thread(read)
    if whole and len(data) <= RETURN_LIMIT and _text_lines(data):
        return data, True
    return header_section(data[:limit]), False


def _text_lines(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return b"\0" not in data and data.count(b"\n") == crlf and data.count(b"\r") == crlf


def header_section(head: bytes) -> bytes:
    """The header fields at the start of ``head`` (a message's first octets), as CRLF
    lines.  BDAT data keeps the line ends it came with: a bare LF ends a line too (the
    body must never be taken for the header), and a lone CR or a NUL of a malformed
    field is not passed on into a report, whose quoted header is text."""
    end = header_end(head)
    if end < 0:  # no body, or a header longer than the limit: whole lines only
        end = head.rfind(b"\n")
        if end < 0:
            return b""
    section = head[:end].removesuffix(b"\r")
    if not section:
        return b""
    section = section.replace(b"\r\n", b"\n").replace(b"\r", b" ").replace(b"\0", b"?")
    return section.replace(b"\n", b"\r\n") + b"\r\n"


def build_dsn(
    *,
    envelope: Envelope,
    failed: list[RecipientResult],
    reporting_mta: str,
    original_headers: bytes,
    whole_message: bool = False,
    arrival: datetime | None = None,
    now: datetime | None = None,
    success: bool = False,
) -> bytes:
    """The report message with CRLF line ends, ready to spool and hand to a destination.

    ``failed`` are the recipients reported on: failures, or with ``success`` the
    successes (each with its RecipientResult.action)."""
    now = now or datetime.now(UTC)
    mta = _safe(reporting_mta)
    boundary = f"=_mailgate_{uuid.uuid4().hex}"
    sender = _safe(str(envelope.sender or ""))

    listing = "\r\n".join(
        f"  <{_safe(str(r.recipient.address))}>: "
        + (f"{r.action} ({_diagnostic(r)})" if success else _diagnostic(r))
        for r in failed
    )
    what = (
        "Your message was delivered to the following recipients, as you asked:"
        if success
        else "Your message could not be delivered to the following recipients:"
    )
    human = f"This is the mail system at {mta}.\r\n\r\n{what}\r\n\r\n{listing}\r\n"
    per_message = [f"Reporting-MTA: dns; {mta}"]
    if envelope.envid:
        per_message.append(f"Original-Envelope-Id: {_safe(envelope.envid)}")
    if arrival is not None:
        per_message.append(f"Arrival-Date: {format_datetime(arrival)}")
    blocks = ["\r\n".join(per_message)]
    for r in failed:
        fields = []
        if r.recipient.orcpt:
            fields.append(f"Original-Recipient: {_safe(r.recipient.orcpt)}")
        final = _safe(str(r.recipient.address))
        fields += [
            f"Final-Recipient: {'rfc822' if final.isascii() else 'utf-8'}; {final}",
            f"Action: {r.action if success else 'failed'}",
            f"Status: {r.reply.enhanced or _default_status(r.reply.code)}",
        ]
        if r.remote_mta:  # RFC 3464 2.3.5: MUST for a failure an MTA we relayed to reported
            fields.append(f"Remote-MTA: dns; {_safe(r.remote_mta)}")
        # RFC 3464 2.3.6: the reply as the reporting MTA received it, the downstream's
        # own where it gave one (our reply, which quotes it, is in the text part)
        diagnostic = _safe(r.remote_reply)[:900] if r.remote_reply else _diagnostic(r)
        fields.append(f"Diagnostic-Code: smtp; {diagnostic}")
        blocks.append("\r\n".join(fields))
    status = "\r\n\r\n".join(blocks) + "\r\n"
    # RFC 3464 2.1: message/delivery-status is 7-bit; a UTF-8 address, ORCPT or
    # downstream reply text makes it RFC 6533's message/global-delivery-status.
    status_type = "message/global-delivery-status" if not status.isascii() else (
        "message/delivery-status"
    )
    # RFC 6533 3.5: the UTF-8 header fields of an SMTPUTF8 message are quoted as
    # message/global-headers (a whole one as message/global); text/rfc822-headers is
    # ASCII.  ``whole_message``: RET=FULL, the message itself (RFC 6522 3).
    global_type = envelope.smtputf8 and not original_headers.isascii()
    if whole_message:
        headers_type = "message/global" if global_type else "message/rfc822"
    else:
        headers_type = "message/global-headers" if global_type else "text/rfc822-headers"
    eight_bit = not (status.isascii() and original_headers.isascii())

    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: {_SUCCESS_SUBJECT if success else _FAILURE_SUBJECT}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@{mta}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        # (RFC 2045 6.4: a multipart holding 8-bit parts is itself 8bit; the text
        # part is UTF-8 and says so on its own)
        + ("Content-Transfer-Encoding: 8bit\r\n" if eight_bit else "")
        + "\r\n"
        "This is a MIME-encapsulated delivery status notification.\r\n"
    )
    parts = [
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + human,
        f"Content-Type: {status_type}\r\n{_encoding(status.isascii())}\r\n" + status,
    ]
    out = head.encode()
    for part in parts:
        out += f"\r\n--{boundary}\r\n{part}".encode()
    out += (
        f"\r\n--{boundary}\r\nContent-Type: {headers_type}\r\n"
        f"{_encoding(original_headers.isascii())}\r\n"
    ).encode()
    out += original_headers
    out += f"\r\n--{boundary}--\r\n".encode()
    return out


def _encoding(ascii_only: bool) -> str:
    """The Content-Transfer-Encoding line a part with 8-bit octets needs (RFC 2045)."""
    return "" if ascii_only else "Content-Transfer-Encoding: 8bit\r\n"


def _default_status(code: int) -> str:
    return "5.0.0" if code >= 500 else "4.0.0" if code >= 400 else "2.0.0"


def _diagnostic(result: RecipientResult) -> str:
    """Our reply on one line: the downstream's words and our own."""
    r = result.reply
    return _safe(f"{r.code} {r.enhanced or ''} {' / '.join(r.lines)}".replace("  ", " "))[:900]


def _safe(text: str) -> str:
    """No control characters: a value can never end a header line."""
    return _CONTROL.sub("?", text)
