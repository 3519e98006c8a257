"""The reply catalogue: every reply mailgate can send, in one place.

Each entry names a code, an RFC 3463 enhanced status code (or None where RFC 2034
says none is sent: the greeting, the HELO/EHLO reply and 3xx intermediate replies)
and a text.  A text may span several lines (separated by ``\\n``); every line of a
multi-line reply carries the same code and enhanced code.

Client-supplied values reach a reply only through :func:`clean`, which drops control
characters (so no CR or LF can ever be echoed) and bounds the length, so a client can
neither inject a reply line nor make one longer than RFC 5321's 512 octets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

# The most characters of any client value echoed in a reply: a whole address (RFC 5321
# 4.5.3.1.3: a path is up to 256 octets), so that replies to pipelined RCPTs tell them
# apart; a line with two such values is still cut at MAX_LINE.
ECHO_LIMIT: Final = 256
MAX_LINE: Final = 512  # RFC 5321 4.5.3.1.5: a reply line, CRLF included


def clean(value: object, limit: int = ECHO_LIMIT) -> str:
    """Make a value safe to echo: printable US-ASCII only (RFC 5321 4.2's textstring;
    RFC 6531 adds no UTF-8 to reply text: a U-label name, a UTF-8 address or a
    mailer's UTF-8 words get a "?" for each other character), at most ``limit``."""
    text = str(value)
    if not (text.isascii() and text.isprintable()):
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# Immutable by contract, not frozen: see mailgate.protocol.events (one or more per
# command).
@dataclass(slots=True, unsafe_hash=True)
class Reply:
    """One (possibly multi-line) reply: the code, the enhanced code and the text lines."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    name: str = ""
    # The wire form, made on first use: replies are immutable and the constant and
    # memoised ones are sent over and over.
    _bytes: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def to_bytes(self) -> bytes:
        data = self._bytes
        if data is None:
            data = _wire(self)
            self._bytes = data
        return data

    def with_preface(self, lines: list[str]) -> Reply:
        """The same reply with extra (cleaned) lines before its own, e.g. a mailer's stderr."""
        extra = tuple(clean(line, 200) for line in lines if line.strip())
        return Reply(self.code, self.enhanced, extra + self.lines, self.name)

    def with_status(self, enhanced: str) -> Reply:
        """The same reply with another RFC 3463 status of its own class (a
        downstream's, which says more than our generic one); unchanged otherwise."""
        match = _STATUS.fullmatch(enhanced)
        if match is None or match.group(1) != str(self.code)[0]:
            return self
        return Reply(self.code, enhanced, self.lines, self.name)

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "replace").rstrip("\r\n")


_STATUS = re.compile(r"([245])\.(?:0|[1-9]\d{0,2})\.(?:0|[1-9]\d{0,2})")


@dataclass(frozen=True, slots=True)
class Template:
    code: int
    enhanced: str | None
    text: str


# fmt: off
CATALOGUE: Final[dict[str, Template]] = {
    # --- connection ----------------------------------------------------------
    "greeting":               Template(220, None, "{host} ESMTP mailgate"),
    "quit":                   Template(221, "2.0.0", "{host} Service closing transmission channel"),
    "closing.timeout":        Template(421, "4.4.2", "{host} Timeout waiting for client input, closing connection"),
    "closing.shutdown":       Template(421, "4.3.2", "{host} shutting down"),
    "closing.too_many_errors": Template(421, "4.7.0", "{host} Too many errors, closing connection"),
    "closing.too_many_connections": Template(421, "4.7.0", "{host} Too many connections, try again later"),
    "closing.too_many_from_client": Template(421, "4.7.0", "{host} Too many connections from your address, try again later"),
    "closing.helo_refused":   Template(421, "4.7.1", "{host} HELO/EHLO name {name} refused: {reason}; closing connection"),
    "closing.internal":       Template(421, "4.3.0", "{host} Local error, closing connection"),
    "closing.auth_throttled": Template(421, "4.7.0", "{host} Too many failed authentication attempts, closing connection"),
    "closing.bare_lf":        Template(521, "5.5.2", "{host} Bare LF or CR received in message data; lines must end with CRLF"),
    "closing.proxy":          Template(421, "4.7.0", "{host} Bad PROXY protocol header, closing connection"),
    # --- session -------------------------------------------------------------
    "helo":                   Template(250, None, "{host} you are {name}"),
    "ok":                     Template(250, "2.0.0", "OK"),
    "noop":                   Template(250, "2.0.0", "OK"),
    "help":                   Template(214, "2.0.0", "Commands: {commands}\nSee RFC 5321"),
    "vrfy.cannot":            Template(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"),
    "vrfy.ok":                Template(250, "2.1.5", "<{address}>"),
    "vrfy.unknown":           Template(550, "5.1.1", "<{address}> ... user unknown"),
    "vrfy.utf8_not_permitted": Template(550, "5.6.8", "A UTF-8 mailbox needs VRFY with the SMTPUTF8 parameter"),
    "expn.disabled":          Template(502, "5.5.1", "EXPN not available"),
    # --- syntax --------------------------------------------------------------
    "syntax.unknown":         Template(500, "5.5.1", "Command unrecognized"),
    "syntax.too_long":        Template(500, "5.5.2", "Line too long"),
    "syntax.bare_lf":         Template(500, "5.5.2", "Bare LF or CR in command line; lines must end with CRLF"),
    "syntax.not_utf8":        Template(500, "5.5.2", "Command line is not valid UTF-8"),
    "syntax.args_not_utf8":   Template(501, "5.5.2", "Arguments are not valid UTF-8"),
    "syntax.args":            Template(501, "5.5.2", "Syntax error in arguments: {detail}"),
    "syntax.sender":          Template(501, "5.1.7", "Bad sender address syntax"),
    "syntax.recipient":       Template(501, "5.1.3", "Bad recipient address syntax"),
    "syntax.param":           Template(555, "5.5.4", "Unsupported or unknown parameter {param}"),
    "syntax.param_value":     Template(501, "5.5.4", "Bad value for parameter {param}"),
    "syntax.param_twice":     Template(501, "5.5.4", "Duplicate parameter {param}"),
    # RFC 6531 3.5: 550 when MAIL needs an ASCII address, 553 when RCPT does
    "syntax.utf8_sender":     Template(550, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter"),
    "syntax.utf8_recipient":  Template(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter"),
    "not_implemented":        Template(502, "5.5.1", "Command not implemented"),
    # --- sequence ------------------------------------------------------------
    "seq.need_helo":          Template(503, "5.5.1", "Start by saying HELO, please"),
    "seq.need_ehlo":          Template(503, "5.5.1", "AUTH needs EHLO, not HELO"),
    "seq.auth_before_ehlo":   Template(503, "5.5.1", "Say EHLO first: AUTH is an ESMTP extension"),
    "seq.need_mail":          Template(503, "5.5.1", "Need MAIL before RCPT"),
    "seq.nested_mail":        Template(503, "5.5.1", "Sender already specified"),
    "seq.need_rcpt":          Template(503, "5.5.1", "No valid recipients"),
    "seq.need_mail_data":     Template(503, "5.5.1", "Need MAIL before DATA"),
    "seq.need_mail_bdat":     Template(503, "5.5.1", "Need MAIL before BDAT, chunk discarded"),
    "seq.data_after_bdat":    Template(503, "5.5.1", "DATA not allowed after BDAT in the same transaction"),
    "seq.binarymime_data":    Template(503, "5.5.1", "BODY=BINARYMIME requires BDAT"),
    "seq.bdat_aborted":       Template(503, "5.5.1", "Transaction aborted, BDAT data discarded"),
    "seq.rcpt_after_bdat":    Template(503, "5.5.1", "RCPT not allowed after BDAT in the same transaction"),
    # --- size and limits -----------------------------------------------------
    "size.declared":          Template(552, "5.3.4", "Message size exceeds fixed maximum message size ({limit} octets)"),
    "size.exceeded":          Template(552, "5.3.4", "Message size exceeds fixed maximum message size ({limit} octets)"),
    "rcpt.too_many":          Template(452, "4.5.3", "Too many recipients"),
    # --- transaction ---------------------------------------------------------
    "mail.ok":                Template(250, "2.1.0", "Sender <{address}> OK"),
    "rcpt.ok":                Template(250, "2.1.5", "Recipient <{address}> OK"),
    "data.go":                Template(354, None, "Start mail input; end with <CRLF>.<CRLF>"),
    "data.accepted":          Template(250, "2.0.0", "OK: queued as {id}"),
    "data.loop":              Template(554, "5.4.6", "Too many hops ({count} Received: header fields), mail loop suspected"),
    "bdat.chunk":             Template(250, "2.0.0", "{size} octets received"),
    # --- STARTTLS (RFC 3207) -------------------------------------------------
    "starttls.ready":         Template(220, "2.0.0", "Ready to start TLS"),
    "starttls.unavailable":   Template(454, "4.7.0", "TLS not available due to temporary reason"),
    "starttls.already":       Template(503, "5.5.1", "TLS already active"),
    "tls.required":           Template(530, "5.7.0", "Must issue a STARTTLS command first"),
    # --- AUTH (RFC 4954) -----------------------------------------------------
    "auth.challenge":         Template(334, None, "{challenge}"),
    "auth.success":           Template(235, "2.7.0", "Authentication successful"),
    "auth.failed":            Template(535, "5.7.8", "Authentication credentials invalid"),
    "auth.bad_base64":        Template(501, "5.5.2", "Cannot Base64-decode client response"),
    "auth.too_long":          Template(500, "5.5.6", "Authentication exchange line is too long"),
    "auth.no_initial_response": Template(501, "5.7.0", "{mechanism} takes no initial response"),
    "auth.bad_response":      Template(501, "5.5.2", "Malformed authentication response"),
    "auth.cancelled":         Template(501, "5.7.0", "Authentication cancelled"),
    "auth.unknown_mech":      Template(504, "5.5.4", "Unrecognized authentication type"),
    "auth.already":           Template(503, "5.5.1", "Already authenticated"),
    "auth.in_transaction":    Template(503, "5.5.1", "AUTH not permitted during a mail transaction"),
    "auth.encryption_required": Template(538, "5.7.11", "Encryption required for requested authentication mechanism"),
    "auth.temporary":         Template(454, "4.7.0", "Temporary authentication failure"),
    "auth.no_channel_binding": Template(504, "5.5.4", "Channel binding is not supported; use SCRAM without -PLUS"),
    "auth.throttled":         Template(454, "4.7.0", "Too many failed authentication attempts, try again later"),
    "auth.required":          Template(530, "5.7.0", "Authentication required"),
    "auth.sender_not_owned":  Template(553, "5.7.1", "Sender address <{address}> not owned by user {user}"),
    # --- policy: HELO, sender, recipient, relay ------------------------------
    "helo.refused":           Template(550, "5.7.1", "HELO/EHLO name {name} refused: {reason}"),
    "protocol.pregreet":      Template(550, "5.5.1", "Protocol error: {ip} talked before the greeting"),
    "sender.domain_missing":  Template(550, "5.1.8", "Sender domain must exist: {domain}"),
    "sender.dns_tempfail":    Template(451, "4.4.3", "Temporary DNS failure looking up sender domain {domain}"),
    "sender.null_mx":         Template(550, "5.7.27", "Sender domain {domain} does not accept mail (null MX)"),
    "rcpt.unknown":           Template(550, "5.1.1", "<{address}> ... user unknown"),
    "rcpt.relay_denied":      Template(550, "5.7.1", "Relaying denied"),
    "rcpt.no_route":          Template(550, "5.4.4", "No route to <{address}>: this server relays to no other domain"),
    "rcpt.loopback_disabled": Template(550, "5.7.1", "Loopback address form user@[] not accepted"),
    "rcpt.bad_mailbox":       Template(553, "5.1.3", "<{address}>: mailbox name not allowed here"),
    "rcpt.utf8_unsupported":  Template(553, "5.6.7", "Non-ASCII addresses not permitted for that recipient"),
    # --- policy: access lists, DNSBL, greylisting (upas filter states) -------
    "access.denied":          Template(550, "5.7.1", "We don't accept mail from {sender}.\nContact postmaster@{host} for more information."),
    "access.client_denied":   Template(550, "5.7.1", "Access denied for {ip}.\nContact postmaster@{host} for more information."),
    "access.blocked":         Template(554, "5.7.1", "we believe this is spam.  we don't accept it."),
    "access.delay":           Template(451, "4.7.1", "Please try again later"),
    "access.dialup":          Template(550, "5.7.1", "We don't accept mail from dial-up ports."),
    "access.rcpt_denied":     Template(550, "5.7.1", "Mail to <{address}> refused by local policy"),
    "access.dnsbl":           Template(550, "5.7.1", "Client {ip} is listed by {zone}: {reason}"),
    "greylist.deferred":      Template(451, "4.7.1", "Greylisted, please try again later"),
    "filter.internal":        Template(451, "4.3.0", "Internal error classifying message"),
    # --- delivery ------------------------------------------------------------
    "delivery.local_error":   Template(451, "4.3.0", "Requested action aborted: local error in processing"),
    # RFC 3463 X.3.5: the routing configuration (alias nesting, a target with no way
    # out) cannot deliver it; the operator is told in the log
    "delivery.misconfigured": Template(451, "4.3.5", "Requested action aborted: local configuration error"),
    "delivery.storage":       Template(452, "4.3.1", "Insufficient system storage"),
    "delivery.mailbox_busy":  Template(450, "4.2.0", "Mailbox busy, try again later"),
    "delivery.mailer_failed": Template(451, "4.3.0", "mail process terminated abnormally"),
    "delivery.mailer_refused": Template(554, "5.6.0", "mail refused by the mail processor"),
    "delivery.downstream_temp": Template(451, "4.4.0", "Downstream delivery failed temporarily, try again later"),
    # another recipient of the message was deferred: it comes again whole, and what
    # this one got now would be a duplicate then
    "delivery.held_back":     Template(451, "4.3.0", "Not passed on now: another recipient was deferred; try the message again later"),
    # some recipients have it, others refused it, and the report to the sender of the
    # refusals could not be sent now: the client is to try again
    "delivery.report_deferred": Template(451, "4.3.0", "Not every recipient could take it, and the report of that cannot be sent now; try again later"),
    "delivery.downstream_perm": Template(554, "5.0.0", "Downstream refused the message"),
    "delivery.partial_unreported": Template(554, "5.0.0", "Not delivered to the recipients above; the others have it, and no report could reach the sender"),
    "delivery.downstream_rcpt_temp": Template(451, "4.4.0", "Downstream deferred <{address}>"),
    "delivery.downstream_rcpt_perm": Template(550, "5.0.0", "Downstream refused <{address}>"),
    "delivery.smarthost_temp": Template(451, "4.4.1", "Smarthost unavailable, try again later"),
    "delivery.smarthost_perm": Template(554, "5.0.0", "Smarthost refused the message"),
    # RFC 3030 3: binary data only to a next hop that offers BINARYMIME
    "delivery.binary_unsupported": Template(554, "5.6.3", "Not passed on: the message holds binary data, and the next hop does not offer BINARYMIME"),
    # RFC 5321 2.4 / RFC 6152 3: no 8-bit octets to a server without 8BITMIME
    "delivery.8bit_unsupported": Template(554, "5.6.3", "Not passed on: the message holds 8-bit data, and the next hop does not offer 8BITMIME"),
    # RFC 6531 3.2: a message that needs SMTPUTF8 must not go to a server without it
    "delivery.utf8_address_unsupported": Template(554, "5.6.7", "Not relayed: a non-ASCII address needs SMTPUTF8, which the smarthost does not offer"),
    "delivery.utf8_sender_unsupported": Template(554, "5.6.7", "Not delivered: the sender's non-ASCII address needs SMTPUTF8, which the mailbox server does not offer"),
    "delivery.utf8_header_unsupported": Template(554, "5.6.9", "Not relayed: UTF-8 header fields need SMTPUTF8, which the smarthost does not offer"),
    "delivery.mailer_unsafe_recipient": Template(550, "5.1.3", "<{address}> cannot be passed to the mail processor"),
    "delivery.mailer_unsafe_sender": Template(550, "5.1.7", "Sender <{address}> cannot be passed to the mail processor"),
}
# fmt: on


def _wire(r: Reply) -> bytes:
    head = f"{r.enhanced} " if r.enhanced else ""
    limit = MAX_LINE - 2 if r.code != 334 else 12288
    lines = r.lines
    if len(lines) == 1:  # most replies: no list to join
        return f"{r.code} {head}{lines[0]}".encode("ascii", "replace")[:limit] + b"\r\n"
    last = len(lines) - 1
    out = []
    for i, line in enumerate(lines):
        raw = f"{r.code}{' ' if i == last else '-'}{head}{line}".encode("ascii", "replace")
        out.append(raw[:limit] + b"\r\n")
    return b"".join(out)


# Values that are ours, not the client's, and may be longer than an echo: a SASL
# challenge is base64 we made (RFC 4954 allows up to 12288 octets a line).
_LIMITS: Final[dict[str, int]] = {"challenge": 12288}


def _build(name: str, tpl: Template, args: dict[str, object]) -> Reply:
    text = (
        tpl.text.format(**{k: clean(v, _LIMITS.get(k, ECHO_LIMIT)) for k, v in args.items()})
        if args
        else tpl.text
    )
    return Reply(tpl.code, tpl.enhanced, tuple(text.split("\n")), name)


# Replies with no placeholders are built once: the hot path only looks them up.
_CONSTANT: Final[dict[str, Reply]] = {
    name: _build(name, tpl, {}) for name, tpl in CATALOGUE.items() if "{" not in tpl.text
}


def reply(key: str, /, **args: object) -> Reply:
    """The catalogue entry ``key``, filled in with cleaned ``args``."""
    constant = _CONSTANT.get(key)
    if constant is not None:
        return constant
    if key in _UNIQUE:
        return _build(key, CATALOGUE[key], args)
    # The text depends on the names and the str() of the values only.
    if len(args) == 1:  # most filled-in replies: a shorter key, made faster
        ((name, value),) = args.items()
        memo_key: tuple[str, ...] = (key, name, str(value))
    else:
        memo_key = (key, *args, *map(str, args.values()))
    filled = _FILLED.get(memo_key)
    if filled is None:
        if len(_FILLED) >= _FILLED_MAX:
            _FILLED.clear()
        filled = _FILLED[memo_key] = _build(key, CATALOGUE[key], args)
    return filled


# Filled-in replies recur: the same sender on every MAIL of a connection, the same
# recipients, HELO names.  The latest ones are kept (with their wire bytes, see
# Reply.to_bytes); a bounded number, since the values come from clients.
_FILLED_MAX: Final = 256
# Filled in with a value that is new every time (a message id): remembering them would
# only push out the replies that do recur, and empty the memo every 256 messages.
_UNIQUE: Final = frozenset({"data.accepted"})
_FILLED: dict[tuple[str, ...], Reply] = {}


def multiline(key: str, lines: list[str], /, **args: object) -> Reply:
    """Entry ``key`` preceded by extra lines (for instance a mailer's stderr)."""
    return reply(key, **args).with_preface(lines)
