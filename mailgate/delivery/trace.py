"""Trace header fields: Received: (RFC 5321 section 4.4) and Return-Path:.

Values that come from the client (HELO name, addresses) are reduced to characters
that cannot end a header line or break its syntax, and bounded in length, so the
folded field never has a line over 998 octets and lines stay under 78 where a
break between clauses allows it.
"""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from mailgate.delivery.base import TraceInfo
from mailgate.protocol.envelope import Address, Envelope
from mailgate.protocol.idn import ascii_domain

_NAME = "Received:"
FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be no longer than 78 characters
_TOKEN_LIMIT = 255  # a domain name's maximum; bounds every client-supplied token
# anything that could end a line, split a clause or unbalance a comment or literal;
# C1 controls and U+2028/2029 too: UTF-8 values (SMTPUTF8) may carry them, and many
# readers (str.splitlines, some MUAs) take NEL or LINE SEPARATOR for a line end
_BREAKS = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_DOMAIN_UNSAFE = re.compile(rf"[{_BREAKS} ()<>\[\]\\;,\"]+")
_DOMAIN_UNSAFE_LITERAL = re.compile(rf"[{_BREAKS} ()<>\\;,\"]+")
_COMMENT_UNSAFE = re.compile(rf"[{_BREAKS}()\\]+")
_CONTROL = re.compile(rf"[{_BREAKS}]+")


def protocol_name(extended: bool, tls: bool, auth: bool, smtputf8: bool) -> str:
    """The ``with`` keyword: RFC 3848 (ESMTP[S][A]) and RFC 6531 (UTF8SMTP[S][A])."""
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def received_header(trace: TraceInfo, envelope: Envelope, now: datetime | None = None) -> bytes:
    """The folded ``Received:`` field with CRLF line ends.

    ``from <helo> (<reverse name or unknown> [<ip>]) (using <TLS> with cipher <c>)
    by <hostname> with <protocol> id <id> for <rcpt>; <RFC 5322 date>``, the ``for``
    clause only when the message has exactly one recipient.
    """
    if now is None:
        date = _now_date(int(time.time()))
    else:
        date = format_datetime(now if now.tzinfo is not None else now.astimezone())
    # Domains go in as A-labels, SMTPUTF8 or not: outside SMTPUTF8 header fields are
    # ASCII (RFC 6532 is for SMTPUTF8 mail only), and within it a field of our own in
    # U-labels would make an otherwise ASCII message one that a next hop without
    # SMTPUTF8 may not be given (RFC 6531 3.2; A-labels are a Domain of 3.7.3 too).
    helo, hostname = ascii_domain(trace.helo), ascii_domain(trace.hostname)
    lines = list(
        _head(
            helo,
            trace.reverse_name,
            trace.client_ip,
            trace.tls_version,
            trace.tls_cipher,
            hostname,
            trace.protocol,
        )
    )
    clauses = ["id " + _atom(trace.session_id or "unknown")]
    if len(envelope.recipients) == 1:
        address = envelope.recipients[0].address
        if not address.domain.isascii():
            address = Address(address.local, ascii_domain(address.domain), address.quoted)
        clauses.append(f"for <{_address(str(address))}>")
    clauses[-1] += ";"
    clauses.append(date)
    _fold(lines, clauses)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


@functools.lru_cache(maxsize=256)
def _head(
    helo: str,
    reverse_name: str | None,
    client_ip: str,
    tls_version: str | None,
    tls_cipher: str | None,
    hostname: str,
    protocol: str,
) -> tuple[str, ...]:
    """The folded lines up to the ``id`` clause: every message of a session shares them."""
    clauses = [
        "from " + _domain(helo),
        f"({_domain(reverse_name or '')} {_literal(client_ip)})",
    ]
    if tls_version or tls_cipher:
        tls = _comment(tls_version or "TLS")
        cipher = f" with cipher {_comment(tls_cipher)}" if tls_cipher else ""
        clauses.append(f"(using {tls}{cipher})")
    clauses += [
        "by " + _domain(hostname),
        "with " + _atom(protocol or "ESMTP"),
    ]
    lines = [_NAME]
    _fold(lines, clauses)
    return tuple(lines)


@functools.lru_cache(maxsize=2)
def _now_date(second: int) -> str:
    """The RFC 5322 local date of a second: every message of that second shares it."""
    return format_datetime(datetime.fromtimestamp(second, UTC).astimezone())


def return_path_header(envelope: Envelope) -> bytes:
    """``Return-Path: <sender>`` with CRLF; ``<>`` for the null sender."""
    sender = envelope.sender
    path = "" if sender is None or sender.is_null else _address(str(sender))
    return f"Return-Path: <{path}>\r\n".encode()


def _fold(lines: list[str], clauses: list[str]) -> None:
    """Append ``clauses`` to the field's ``lines``, each on the last line if it fits."""
    for clause in clauses:
        if len(lines[-1]) + 1 + len(clause) > FOLD_AT and lines[-1] != _NAME:
            lines.append("\t" + clause)
        else:
            lines[-1] += " " + clause


def _bounded(text: str) -> str:
    return text[:_TOKEN_LIMIT]


def _domain(value: str) -> str:
    if value.startswith("[") and value.endswith("]") and len(value) > 2:
        inner = _DOMAIN_UNSAFE_LITERAL.sub("_", value[1:-1]).replace("[", "_").replace("]", "_")
        return _bounded(f"[{inner}]")
    return _bounded(_DOMAIN_UNSAFE.sub("_", value)) or "unknown"


def _literal(ip: str) -> str:
    ip = _DOMAIN_UNSAFE.sub("_", ip)[:_TOKEN_LIMIT]
    if ip.lower().startswith("ipv6:"):
        return f"[{ip}]"
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def _comment(value: str) -> str:
    return _bounded(_COMMENT_UNSAFE.sub("_", value).strip()) or "unknown"


def _atom(value: str) -> str:
    return _bounded(_DOMAIN_UNSAFE.sub("_", value)) or "unknown"


def _address(value: str) -> str:
    if value.isprintable():  # holds no _BREAKS (all unprintable): no regex to run
        return value.replace(">", "?")[: 2 * _TOKEN_LIMIT]
    return _CONTROL.sub("?", value).replace(">", "?")[: 2 * _TOKEN_LIMIT]
