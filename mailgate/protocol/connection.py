"""The SMTP server state machine, sans-I/O (in the manner of h11).

Feed bytes with :meth:`Connection.receive_data`, pull events with
:meth:`Connection.next_event` until it returns ``NEED_DATA``, answer decision events
(see :mod:`mailgate.protocol.events`), and send what :meth:`data_to_send` returns.
Replies the engine can give on its own (syntax, sequence, limits) never become events
(except a :class:`Rejected` note for logs); the replies of one pipelined group collect
in the output buffer until the driver flushes it, so they leave in one write.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from mailgate.protocol import events as ev
from mailgate.protocol.body import ChunkReader, DotReader
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.grammar import (
    GrammarError,
    decode_xtext,
    is_local_part,
    parse_helo_name,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_path,
    split_path_and_params,
)
from mailgate.protocol.replies import Reply, reply

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, CRLF included
MAX_MAIL_RCPT_LINE = 2048  # room for SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH=, NOTIFY, ORCPT
MAX_AUTH_LINE = 12288  # RFC 4954 4: AUTH lines and SASL responses
# replies queued before next_event asks the driver to send them (SEND_FIRST): ~80 KB of
# EHLO replies at most, and under the transport's 64 KiB high-water mark for most
MAX_QUEUED_REPLIES = 256
_SASL_PLAINTEXT = frozenset({"PLAIN", "LOGIN"})
# Mechanisms in which the server speaks first: an initial response to them is 501
# 5.7.0 (RFC 4954 4).  PLAIN, LOGIN (its user name) and SCRAM may start with one.
SERVER_FIRST = frozenset({"CRAM-MD5"})
# the sequence refusals that follow from a refused MAIL, RCPT or BDAT
_FOLLOW_ONS = frozenset({"seq.need_mail", "seq.need_mail_data", "seq.need_rcpt",
                         "seq.bdat_aborted", "seq.need_mail_bdat"})
_MAX_BDAT_DIGITS = 18


@dataclass(frozen=True, slots=True)
class Settings:
    """What the engine needs to know about this server and this client's listener."""

    hostname: str
    max_message_size: int = 36_700_160
    max_recipients: int = 100
    max_errors: int = 20
    # NOOP, RSET, VRFY and HELP answered a client may send between two transactions
    # (MAILs accepted) before each one more counts towards max_errors (Postfix's
    # smtpd_junk_command_limit): a client keeping a connection busy with them is
    # stalling, not sending mail
    junk_command_limit: int = 100
    starttls: bool = False  # a certificate is configured
    auth_mechanisms: tuple[str, ...] = ()  # configured SASL mechanisms, upper case
    allow_plaintext_auth: bool = False  # PLAIN/LOGIN without TLS
    require_tls: bool = False  # no MAIL/AUTH before STARTTLS
    require_auth: bool = False  # no MAIL before AUTH (submission)
    vrfy: bool = False  # VRFY becomes a decision event instead of 252
    normalize_bare_lf: bool = False  # this client may end lines with bare LF


# EHLO replies recur (the same clients, the same listeners): the latest ones are kept
# with their wire bytes (see Reply.to_bytes), by everything their lines depend on.
# Building one and its wire form was ~12 µs, a few per cent of a one-message session.
_EHLO_MEMO: dict[tuple[Settings, str, bool, bool], Reply] = {}
_EHLO_MEMO_MAX = 256  # bounded: the names come from clients


class State(Enum):
    COMMAND = auto()
    DATA = auto()
    BDAT = auto()
    AUTH = auto()  # waiting for a SASL response line
    TLS = auto()  # 220 sent, waiting for the handshake
    CLOSED = auto()


# The states as module globals: looking a member up on its Enum class costs ~15 times
# a global lookup in Python 3.11, and the engine tests its state on every step.
_COMMAND, _DATA, _BDAT, _AUTH, _TLS, _CLOSED = (
    State.COMMAND, State.DATA, State.BDAT, State.AUTH, State.TLS, State.CLOSED,
)


class Connection:
    """One SMTP server session's protocol state."""

    # Slots: ten thousand idle sessions each hold one of these.
    __slots__ = (
        "_body_open", "_body_size", "_buf", "_chunk", "_chunk_last", "_chunk_sink",
        "_deferred", "_discard_line", "_dot", "_events", "_junk", "_out", "_pending",
        "_send_later", "_sent_2xx", "_sent_3xx", "_sent_4xx", "_sent_5xx", "_too_big",
        "authenticated", "envelope", "errors", "extended", "helo", "quit", "settings",
        "state", "tls_active",
    )  # fmt: skip

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._send_later: Reply | None = None
        self.state = _COMMAND
        self.helo: str | None = None
        self.extended = False
        self.tls_active = False
        self.authenticated: str | None = None
        self.errors = 0  # refusals so far (reject accounting)
        self._junk = 0  # NOOP, RSET, VRFY and HELP answered since the last MAIL accepted
        # Replies queued since take_replies_sent(), by class (for the metrics); plain
        # slots rather than a list, which cost an idle session 136 bytes more.
        self._sent_2xx = self._sent_3xx = self._sent_4xx = self._sent_5xx = 0
        self.envelope: Envelope | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        # A list, not a deque: it rarely holds more than two events, and an empty
        # deque costs ten times the memory of an empty list.
        self._events: list[ev.Event] = []
        self._pending: ev.Event | None = None
        self._dot: DotReader | None = None
        self._chunk: ChunkReader | None = None
        self._chunk_last = False
        self._chunk_sink = False  # discard the current BDAT chunk
        self._body_size = 0
        self._too_big = False
        self._body_open = False  # a body was accepted and is not finished yet
        # inside an over-long line: the refusal it gets at its end (a SASL line's is
        # RFC 4954's 500 5.5.6), else None
        self._discard_line: str | None = None
        self.quit = False  # the session ends at the client's QUIT, not at our word
        # This transaction met a temporary refusal (greylisting, DNS trouble): the 503s
        # its pipelined follow-ups get are no fault of the client's (see _refuse); at
        # most this many, so that a client cannot go on with them for ever.
        self._deferred = 0

    # -- driver API ------------------------------------------------------------

    def greet(self) -> None:
        self._send(reply("greeting", host=self.settings.hostname))

    def refuse(self, r: Reply) -> None:
        """Refuse the session at connect (421/554) and close."""
        self._send(r)
        self._close()

    def timeout(self) -> None:
        self._send(reply("closing.timeout", host=self.settings.hostname))
        self._close()

    def shutdown(self, r: Reply | None = None) -> None:
        self._send(r or reply("closing.shutdown", host=self.settings.hostname))
        self._close()

    def receive_data(self, data: bytes) -> None:
        # In the TLS state the driver has already switched its transport to TLS, so
        # what arrives now came through the handshake (a client may send EHLO before
        # the driver calls tls_started()); plaintext pipelined after STARTTLS was
        # dropped when STARTTLS was accepted.
        if self.state is not _CLOSED:
            self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    @property
    def between_transactions(self) -> bool:
        """No mail transaction is open and no AUTH, TLS or data exchange is under way:
        a server going down can close now (421) without cutting anything off."""
        return self.state is _COMMAND and self.envelope is None

    @property
    def in_data(self) -> bool:
        return self.state in (_DATA, _BDAT)

    def take_replies_sent(self) -> tuple[int, int, int, int]:
        """How many 2xx, 3xx, 4xx and 5xx replies were queued since the last call."""
        counts = (self._sent_2xx, self._sent_3xx, self._sent_4xx, self._sent_5xx)
        self._sent_2xx = self._sent_3xx = self._sent_4xx = self._sent_5xx = 0
        return counts

    def data_to_send(self) -> bytes:
        out = self._out
        # Usually one reply: hand its bytes over as they are, without a join.
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def next_event(self) -> ev.Event | ev._Sentinel:
        while True:
            if self._events:
                return self._events.pop(0)
            if self._pending is not None:
                return ev.PAUSED
            if len(self._out) >= MAX_QUEUED_REPLIES:
                # A run the engine answers alone must not turn a megabyte of input into
                # twenty of replies before anything is sent (HELP is 6 octets, its reply
                # over 100): the driver sends them, and a client that does not read
                # them is paused like any other.
                return ev.SEND_FIRST
            state = self.state
            if state is _COMMAND:
                line = self._take_line(None)
                if line is None:
                    return ev.NEED_DATA
                self._command(line)
            elif state is _DATA:
                if not self._read_data():
                    return ev.NEED_DATA
            elif state is _BDAT:
                if not self._read_chunk():
                    return ev.NEED_DATA
            elif state is _AUTH:
                line = self._take_line(MAX_AUTH_LINE)
                if line is None:
                    return ev.NEED_DATA
                self._auth_line(line)
            else:  # TLS (waiting for the handshake) or CLOSED
                return ev.NEED_DATA

    # -- decisions ---------------------------------------------------------------

    def accept(self, r: Reply | None = None) -> None:
        """Accept the pending decision, with the default reply unless one is given."""
        pending = self._take_pending()
        accept = self._ACCEPT.get(type(pending))
        if accept is None:
            raise RuntimeError(f"accept() with no decision pending ({pending!r})")
        accept(self, pending, r)

    def _accept_helo(self, pending: ev.Helo, r: Reply | None) -> None:
        self.helo = pending.name
        self.extended = pending.extended
        r = r or self._helo_reply(pending)
        self._reset_transaction(r)
        self._send(r)

    def _accept_mail(self, pending: ev.MailFrom, r: Reply | None) -> None:
        self._deferred = 0
        # A transaction begun is mail being moved: the RSET that ends one a greylisting
        # server answered 450 is no stalling (nor are the NOOPs of a queue run).
        self._junk = 0
        self.envelope = pending.envelope
        sender = pending.envelope.sender
        self._send(r or reply("mail.ok", address=str(sender) if sender else ""))

    def _accept_rcpt(self, pending: ev.RcptTo, r: Reply | None) -> None:
        assert self.envelope is not None
        self.envelope.recipients.append(pending.recipient)
        self._send(r or reply("rcpt.ok", address=str(pending.recipient.address)))

    def _accept_data(self, pending: ev.DataStart, r: Reply | None) -> None:
        self._start_body(pending.chunked)
        if not pending.chunked:
            self._send(r or reply("data.go"))

    def _accept_message(self, pending: ev.MessageEnd, r: Reply | None) -> None:
        self._send(r or reply("data.accepted", id="-"))
        self._reset_transaction()

    def _accept_starttls(self, pending: ev.StartTLS, r: Reply | None) -> None:
        self._send(r or reply("starttls.ready"))
        self._buf.clear()  # RFC 3207 5: pipelined plaintext after STARTTLS is void
        self.state = _TLS

    def _accept_verify(self, pending: ev.Verify, r: Reply | None) -> None:
        self._junk_command()  # (a refused one counts as a refusal, once)
        self._send(r or reply("vrfy.ok", address=str(pending.address)))

    # By exact type, not an isinstance chain: accept() runs for every command.  The
    # engine makes the events itself, so there are no subclasses to consider.
    _ACCEPT: dict[type, Callable[[Connection, Any, Reply | None], None]] = {
        ev.Helo: _accept_helo,
        ev.MailFrom: _accept_mail,
        ev.RcptTo: _accept_rcpt,
        ev.DataStart: _accept_data,
        ev.MessageEnd: _accept_message,
        ev.StartTLS: _accept_starttls,
        ev.Verify: _accept_verify,
    }

    def reject(self, r: Reply, *, close: bool = False, counted: bool = True) -> None:
        """Refuse the pending decision with ``r`` (and hang up if ``close``).

        ``counted=False``: no fault of the client's (a message its recipients'
        destinations failed), so it does not count towards max_errors."""
        pending = self._take_pending()
        # A whole pipelined transaction may follow, its RCPTs and DATA (or chunks)
        # answered 503 for what we refused: after any refusal of MAIL, and after a
        # temporary one of a RCPT (a permanent one is the client's own fault).
        if r.code < 500 or isinstance(pending, ev.MailFrom):
            self._deferred = self.settings.max_recipients + 2
        if isinstance(pending, ev.DataStart) and pending.chunked:
            # The chunk that came with the refused BDAT must still be read (RFC 3030).
            self._chunk_sink = True
            self._reset_transaction()
            self._send_later = r
        else:
            if isinstance(pending, ev.MessageEnd):
                self._reset_transaction()
            self._send(r, counted)
        if close:
            self._close()

    def tls_started(self) -> None:
        """The handshake succeeded: forget everything learned before (RFC 3207 4.2)."""
        self.tls_active = True
        self.helo = None
        self.extended = False
        self.authenticated = None
        self._reset_transaction(reply("starttls.ready"))
        self.state = _COMMAND

    def auth_challenge(self, challenge: bytes) -> None:
        self._take_pending()
        self._send(reply("auth.challenge", challenge=base64.b64encode(challenge).decode()))
        self.state = _AUTH

    def auth_success(self, user: str) -> None:
        self._take_pending()
        self.authenticated = user
        self.state = _COMMAND
        # What the client pipelined after AUTH is read on: RFC 4954 4 allows a group
        # behind an AUTH whose initial response completes it (PLAIN), and there is no
        # security layer whose start would make those bytes suspect.
        self._send(reply("auth.success"))

    def auth_failure(self, r: Reply, *, close: bool = False) -> None:
        self._take_pending()
        self.state = _COMMAND
        self._send(r)
        if close:
            self._close()

    # -- internals: output -------------------------------------------------------


    def _send(self, r: Reply, counted: bool = True) -> None:
        if self.state is _CLOSED:
            return
        code = r.code
        if code < 300:
            self._sent_2xx += 1
        elif code < 400:
            self._sent_3xx += 1
        elif code < 500:
            # Not counted: a temporary refusal is ours (DNS trouble, a full disk, a
            # shutdown) or part of the normal retry dance (greylisting, 452 for the
            # 101st recipient), and a legitimate MTA meets many in one session.
            self._sent_4xx += 1
        else:
            self._sent_5xx += 1
            if counted:
                self.errors += 1
        self._out.append(r.to_bytes())

    def _close(self) -> None:
        if self.state is not _CLOSED:
            self.state = _CLOSED
            self._buf.clear()
            self._events.append(ev.Closed())

    def _refuse(self, command: str, r: Reply) -> None:
        # A pipelining MTA sends RCPT, DATA (or its BDAT chunks) without waiting: after
        # a refused MAIL or a 4xx to RCPT their 503s follow from our refusal, and
        # counted they had greylisted senders cut off, and a refused sender's twelve
        # recipients tarpitted past RFC 5321's five-minute timeout (max_errors counts
        # only what the client got wrong).
        counted = not (self._deferred and r.name in _FOLLOW_ONS)
        if not counted:
            self._deferred -= 1
        self._send(r, counted)
        self._events.append(ev.Rejected(command, r, counted))

    def _decide(self, event: ev.Event) -> None:
        self._pending = event
        self._events.append(event)

    def _take_pending(self) -> ev.Event:
        pending = self._pending
        if pending is None:
            raise RuntimeError("no decision is pending")
        self._pending = None
        return pending

    def _reset_transaction(self, why: Reply | None = None) -> None:
        """Forget the transaction.  A body still open (between BDAT chunks, RFC 3030
        lets RSET discard them) is reported as MessageAborted so that the driver drops
        its spool; ``why`` is the reply the engine sends for it: a refusal, or the
        success of the command (RSET, HELO/EHLO, STARTTLS) that abandons it."""
        if self._body_open:
            self._body_open = False
            why = why or reply("seq.bdat_aborted")
            self._events.append(ev.MessageAborted(why, abandoned=why.code < 400))
        self.envelope = None
        self._dot = None
        self._body_size = 0
        self._too_big = False

    def _helo_reply(self, helo: ev.Helo) -> Reply:
        if not helo.extended:
            return reply("helo", host=self.settings.hostname, name=helo.name)
        key = (self.settings, helo.name, self.tls_active, bool(self.authenticated))
        memo = _EHLO_MEMO.get(key)
        if memo is not None:
            return memo
        s = self.settings
        lines = [
            reply("helo", host=s.hostname, name=helo.name).lines[0],
            "PIPELINING",
            f"SIZE {s.max_message_size}",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ]
        if s.starttls and not self.tls_active:
            lines.append("STARTTLS")
        mechs = self._offered_mechanisms()
        if mechs and not self.authenticated:
            lines.append("AUTH " + " ".join(mechs))
        if s.vrfy:
            lines.append("VRFY")
        built = Reply(250, None, tuple(lines), "ehlo")
        if len(_EHLO_MEMO) >= _EHLO_MEMO_MAX:
            _EHLO_MEMO.clear()
        _EHLO_MEMO[key] = built
        return built

    def _offered_mechanisms(self) -> list[str]:
        s = self.settings
        if s.require_tls and not self.tls_active:
            return []
        plaintext_ok = self.tls_active or s.allow_plaintext_auth
        return [m for m in s.auth_mechanisms if plaintext_ok or m not in _SASL_PLAINTEXT]

    # -- internals: input --------------------------------------------------------

    def _take_line(self, limit: int | None) -> bytes | Reply | None:
        """The next complete line without its line end, None if incomplete, or the
        refusal to send for a line that is no command at all.

        Over-long lines are discarded up to their end (500 5.5.2); lines ended by a
        bare LF (or holding a bare CR) get 500 5.5.2 unless this client may use bare
        LF.  The refusal is returned rather than sent so that the caller can apply the
        error budget first (and a client line that is literally NUL is still a line).
        """
        buf = self._buf
        if not buf:  # the usual state between commands
            return None
        nl = buf.find(b"\n")
        # Fast path, the usual command: complete, CRLF-ended, within the smallest
        # limit (so within any), no stray CR.  Everything else takes the full checks.
        if 0 < nl < MAX_COMMAND_LINE and buf[nl - 1] == 13 and not self._discard_line:  # CR
            line = bytes(buf[: nl - 1])
            if b"\r" not in line:
                del buf[: nl + 1]
                return line
        if limit is None:
            head = bytes(buf[:4]).upper()
            limit = (
                MAX_AUTH_LINE
                if head == b"AUTH"
                else MAX_MAIL_RCPT_LINE
                if head in (b"MAIL", b"RCPT")
                else MAX_COMMAND_LINE
            )
        if nl < 0:
            if len(buf) > limit and not self._discard_line:
                self._discard_line = _too_long(limit)
            if self._discard_line:
                del buf[:]
            return None
        if self._discard_line or nl + 1 > limit:
            del buf[: nl + 1]
            name, self._discard_line = self._discard_line or _too_long(limit), None
            return reply(name)
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        elif not self.settings.normalize_bare_lf:
            return reply("syntax.bare_lf")
        if b"\r" in line:
            return reply("syntax.bare_lf")
        return line

    def _command(self, raw: bytes | Reply) -> None:
        line: str | None = None
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                # RFC 5321 4.1.2: a command with invalid character codes is 501; a
                # line whose verb is none of ours stays 500
                known = raw.split(b" ", 1)[0].upper().decode("latin-1") in self._HANDLERS
                raw = reply("syntax.args_not_utf8" if known else "syntax.not_utf8")
        verb, _, arg = (line or "").partition(" ")
        # Verbs are ASCII: str.upper() would turn "ma\u0131l" (dotless i) into MAIL.
        verb = verb.upper() if verb.isascii() else "?"
        # upas rejectcheck: past the error budget every command but QUIT gets 421,
        # a line refused for its form (too long, bare LF) included.
        if self.errors >= self.settings.max_errors and verb != "QUIT":
            # a Rejected event too: the refusal is logged and counted like any other
            self._refuse(verb[:16] or "empty",
                         reply("closing.too_many_errors", host=self.settings.hostname))
            self._close()
            return
        if line is None:
            assert isinstance(raw, Reply)
            self._refuse("line", raw)
            return
        handler = self._HANDLERS.get(verb)
        if handler is None:
            self._refuse(verb[:16] or "empty", reply("syntax.unknown"))
            return
        try:
            handler(self, arg)
        except GrammarError as err:
            self._refuse(verb, reply(err.reply, **err.args_))

    # -- commands ----------------------------------------------------------------

    def _cmd_helo(self, arg: str, extended: bool = False) -> None:
        name = parse_helo_name(arg)
        self._decide(ev.Helo(name, extended))

    def _cmd_ehlo(self, arg: str) -> None:
        self._cmd_helo(arg, extended=True)

    def _cmd_mail(self, arg: str) -> None:
        s = self.settings
        if self.helo is None:
            return self._refuse("MAIL", reply("seq.need_helo"))
        if self.envelope is not None:
            return self._refuse("MAIL", reply("seq.nested_mail"))
        if s.require_tls and not self.tls_active:
            return self._refuse("MAIL", reply("tls.required"))
        if s.require_auth and not self.authenticated:
            return self._refuse("MAIL", reply("auth.required"))
        try:
            path, items = split_path_and_params(arg, "FROM:")
        except GrammarError:
            return self._refuse("MAIL", reply("syntax.args", detail="expected FROM:<address>"))
        params = parse_params(items)
        env = Envelope(helo=self.helo, extended=self.extended)
        for p in params:
            self._mail_param(env, p.keyword, p.value)
        try:
            sender = parse_path(path, utf8=env.smtputf8, allow_null=True)
        except GrammarError:
            if not env.smtputf8 and not path.isascii():
                return self._refuse("MAIL", reply("syntax.utf8_sender"))
            return self._refuse("MAIL", reply("syntax.sender"))
        if sender.domain == "[]":
            # upas's "this host" form is a recipient's; as a sender it names nobody
            # anyone could answer (RFC 5321 4.1.3 has no empty address literal)
            return self._refuse("MAIL", reply("syntax.sender"))
        env.sender = sender
        if env.declared_size is not None and env.declared_size > s.max_message_size:
            return self._refuse("MAIL", reply("size.declared", limit=s.max_message_size))
        self._decide(ev.MailFrom(env))

    def _mail_param(self, env: Envelope, kw: str, value: str | None) -> None:
        if not self.extended:
            raise GrammarError("syntax.param", param=kw)
        if kw == "SIZE":
            # ASCII digits only (RFC 5234 DIGIT): str.isdigit() takes "²" and "٣" too
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise GrammarError("syntax.param_value", param=kw)
            env.declared_size = int(value)
        elif kw == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME", "BINARYMIME"):
                raise GrammarError("syntax.param_value", param=kw)
            env.body = body
        elif kw == "SMTPUTF8":
            if value is not None:
                raise GrammarError("syntax.param_value", param=kw)
            env.smtputf8 = True
        elif kw == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise GrammarError("syntax.param_value", param=kw)
            env.ret = ret
        elif kw == "ENVID":
            if value is None:
                raise GrammarError("syntax.param_value", param=kw)
            env.envid = decode_xtext(value, kw)
            if len(env.envid) > 100:  # RFC 3461 4.4
                raise GrammarError("syntax.param_value", param=kw)
        elif kw == "AUTH":
            # RFC 4954 5 defines it for a server that offers AUTH; elsewhere it is a
            # parameter as unknown as any other (RFC 5321 4.1.1.11: 555)
            if not self._offered_mechanisms():
                raise GrammarError("syntax.param", param=kw)
            if value is None:
                raise GrammarError("syntax.param_value", param=kw)
            env.auth = decode_xtext(value, kw)
        else:
            raise GrammarError("syntax.param", param=kw)

    def _cmd_rcpt(self, arg: str) -> None:
        if self.helo is None:
            return self._refuse("RCPT", reply("seq.need_helo"))
        env = self.envelope
        if env is None:
            return self._refuse("RCPT", reply("seq.need_mail"))
        if env.chunked:
            # The driver holds this envelope since the first BDAT; it cannot grow now.
            return self._refuse("RCPT", reply("seq.rcpt_after_bdat"))
        if len(env.recipients) >= self.settings.max_recipients:
            return self._refuse("RCPT", reply("rcpt.too_many"))
        try:
            path, items = split_path_and_params(arg, "TO:")
        except GrammarError:
            return self._refuse("RCPT", reply("syntax.args", detail="expected TO:<address>"))
        notify: tuple[str, ...] = ()
        orcpt: str | None = None
        for p in parse_params(items):
            if not self.extended:
                raise GrammarError("syntax.param", param=p.keyword)
            if p.keyword == "NOTIFY" and p.value:
                notify = parse_notify(p.value)
            elif p.keyword == "ORCPT" and p.value:
                orcpt = parse_orcpt(p.value, env.smtputf8)
            elif p.keyword in ("NOTIFY", "ORCPT"):
                raise GrammarError("syntax.param_value", param=p.keyword)
            else:
                raise GrammarError("syntax.param", param=p.keyword)
        if path.lower() == "<postmaster>":
            address = Address("postmaster", "")
        else:
            try:
                address = parse_path(path, utf8=env.smtputf8, allow_null=False)
            except GrammarError:
                if not env.smtputf8 and not path.isascii():
                    return self._refuse("RCPT", reply("syntax.utf8_recipient"))
                return self._refuse("RCPT", reply("syntax.recipient"))
        self._decide(ev.RcptTo(Recipient(address, notify, orcpt), env))

    def _cmd_data(self, arg: str) -> None:
        if arg:
            return self._refuse("DATA", reply("syntax.args", detail="DATA takes no argument"))
        env = self.envelope
        if env is None:
            return self._refuse("DATA", reply("seq.need_mail_data"))
        if env.chunked:
            return self._refuse("DATA", reply("seq.data_after_bdat"))
        if not env.recipients:
            return self._refuse("DATA", reply("seq.need_rcpt"))
        if env.body == "BINARYMIME":
            return self._refuse("DATA", reply("seq.binarymime_data"))
        self._decide(ev.DataStart(env.copy(), chunked=False))

    def _cmd_bdat(self, arg: str) -> None:
        parts = arg.split(" ")
        size_text = parts[0]
        last = len(parts) == 2 and parts[1].upper() == "LAST"
        # RFC 3030 chunk-size is 1*DIGIT, ASCII: a reader that took "٣" for 3 would
        # take what follows for data where another sees commands
        digits = size_text.isascii() and size_text.isdigit()
        if not digits or len(size_text) > _MAX_BDAT_DIGITS:
            return self._refuse("BDAT", reply("syntax.args", detail="BDAT <size> [LAST]"))
        size = int(size_text)
        self._chunk = ChunkReader(size)
        self._chunk_last = last
        self.state = _BDAT
        env = self.envelope
        if len(parts) > 2 or (len(parts) == 2 and not last):
            return self._sink_chunk(reply("syntax.args", detail="BDAT <size> [LAST]"))
        if env is None:
            return self._sink_chunk(reply("seq.need_mail_bdat"))
        if not env.recipients:
            return self._sink_chunk(reply("seq.need_rcpt"))
        if env.chunked:
            self._chunk_sink = False
            return
        env.chunked = True
        self._chunk_sink = False
        self._decide(ev.DataStart(env.copy(), chunked=True))

    def _sink_chunk(self, r: Reply) -> None:
        """Read and drop the chunk of a refused BDAT, then send ``r``."""
        self._chunk_sink = True
        self._send_later = r
        self._reset_transaction(r)

    def _junk_command(self) -> None:
        """A command that moves no mail: past the limit each one counts as an error,
        so that max_errors ends a session kept open by them (421, as for refusals)."""
        self._junk += 1
        if self._junk > self.settings.junk_command_limit:
            self.errors += 1

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            return self._refuse("RSET", reply("syntax.args", detail="RSET takes no argument"))
        self._junk_command()
        self._reset_transaction(reply("ok"))
        self._deferred = 0
        self._send(reply("ok"))

    def _cmd_noop(self, arg: str) -> None:
        self._junk_command()
        self._send(reply("noop"))

    def _cmd_quit(self, arg: str) -> None:
        if arg:
            return self._refuse("QUIT", reply("syntax.args", detail="QUIT takes no argument"))
        self._send(reply("quit", host=self.settings.hostname))
        self.quit = True
        self._close()

    def _cmd_help(self, arg: str) -> None:
        self._junk_command()
        # what this session would take now: STARTTLS and AUTH only where they are on
        # offer (listed always, they were answered 502 on a listener without them)
        commands = "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
        if self.settings.starttls and not self.tls_active:
            commands += " STARTTLS"
        if self._offered_mechanisms() and not self.authenticated:
            commands += " AUTH"
        self._send(reply("help", commands=commands))

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg.strip():
            return self._refuse("VRFY", reply("syntax.args", detail="VRFY <address>"))
        if not self.settings.vrfy:
            self._junk_command()
            self._send(reply("vrfy.cannot"))
            return
        text = arg.strip()
        # RFC 6531 3.7.4.2: "VRFY String [SP SMTPUTF8]"; without the parameter no UTF-8
        # may be asked about or answered (550 X.6.8, never echoed).
        words = text.rsplit(None, 1)
        utf8 = len(words) == 2 and words[1].upper() == "SMTPUTF8"
        if utf8:
            text = words[0]
        elif not text.isascii():
            return self._refuse("VRFY", reply("vrfy.utf8_not_permitted"))
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if "@" not in text and is_local_part(text, utf8=utf8):
            # RFC 5321 3.5.3: VRFY may name a user without a domain (a local user).
            self._decide(ev.Verify(Address(text, "")))
            return
        try:
            address = parse_path(f"<{text}>", utf8=utf8, allow_null=False)
        except GrammarError:
            return self._refuse("VRFY", reply("syntax.recipient"))
        self._decide(ev.Verify(address))

    def _cmd_expn(self, arg: str) -> None:
        self._refuse("EXPN", reply("expn.disabled"))

    def _cmd_starttls(self, arg: str) -> None:
        if not self.settings.starttls:
            return self._refuse("STARTTLS", reply("not_implemented"))
        if arg:
            return self._refuse(
                "STARTTLS", reply("syntax.args", detail="STARTTLS takes no argument")
            )
        if self.tls_active:
            return self._refuse("STARTTLS", reply("starttls.already"))
        self._decide(ev.StartTLS())

    def _cmd_auth(self, arg: str) -> None:
        s = self.settings
        if not s.auth_mechanisms:
            return self._refuse("AUTH", reply("not_implemented"))
        if self.helo is None:  # (no greeting yet: "not HELO" would be a riddle)
            return self._refuse("AUTH", reply("seq.auth_before_ehlo"))
        if not self.extended:
            return self._refuse("AUTH", reply("seq.need_ehlo"))
        if self.authenticated:
            return self._refuse("AUTH", reply("auth.already"))
        if self.envelope is not None:
            return self._refuse("AUTH", reply("auth.in_transaction"))
        if s.require_tls and not self.tls_active:
            return self._refuse("AUTH", reply("tls.required"))
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if not mech or " " in initial:
            return self._refuse("AUTH", reply("syntax.args", detail="AUTH <mechanism> [response]"))
        if mech not in s.auth_mechanisms:
            return self._refuse("AUTH", reply("auth.unknown_mech"))
        if mech not in self._offered_mechanisms():
            return self._refuse("AUTH", reply("auth.encryption_required"))
        data: bytes | None = None
        if initial == "*":
            return self._refuse("AUTH", reply("auth.cancelled"))
        if initial and mech in SERVER_FIRST:
            return self._refuse("AUTH", reply("auth.no_initial_response", mechanism=mech))
        if initial:
            # "=" is the empty initial response (RFC 4954 4), only here
            data = b"" if initial == "=" else _b64(initial)
            if data is None:
                return self._refuse("AUTH", reply("auth.bad_base64"))
        self._decide(ev.AuthStart(mech, data))

    def _auth_line(self, raw: bytes | Reply) -> None:
        # The exchange ends here unless the driver answers with another challenge.
        self.state = _COMMAND
        if isinstance(raw, Reply):
            self._send(raw)
            self._events.append(ev.AuthAborted(raw))
            return
        # No stripping: RFC 4954 4 has the server reject, not ignore, any character
        # outside the base64 alphabet.
        text = raw.decode("ascii", "replace")
        if text == "*":
            r = reply("auth.cancelled")
            self._send(r)
            self._events.append(ev.AuthAborted(r))
            return
        data = _b64(text) if text else b""
        if data is None:
            r = reply("auth.bad_base64")
            self._send(r)
            self._events.append(ev.AuthAborted(r))
            return
        self._decide(ev.AuthResponse(data))

    _HANDLERS = {
        "HELO": _cmd_helo,
        "EHLO": _cmd_ehlo,
        "MAIL": _cmd_mail,
        "RCPT": _cmd_rcpt,
        "DATA": _cmd_data,
        "BDAT": _cmd_bdat,
        "RSET": _cmd_rset,
        "NOOP": _cmd_noop,
        "QUIT": _cmd_quit,
        "HELP": _cmd_help,
        "VRFY": _cmd_vrfy,
        "EXPN": _cmd_expn,
        "STARTTLS": _cmd_starttls,
        "AUTH": _cmd_auth,
    }

    # -- body ----------------------------------------------------------------------

    def _start_body(self, chunked: bool) -> None:
        self._body_size = 0
        self._too_big = False
        self._body_open = True
        if chunked:
            self.state = _BDAT
        else:
            self._dot = DotReader(self.settings.normalize_bare_lf)
            self.state = _DATA

    def _account(self, data: bytes) -> None:
        """Count body bytes; past the size limit stop passing them on."""
        if not data or self._too_big:
            return
        self._body_size += len(data)
        if self._body_size > self.settings.max_message_size:
            self._too_big = True
            return
        self._events.append(ev.BodyChunk(data))

    def _read_data(self) -> bool:
        if not self._buf:
            return False
        assert self._dot is not None
        result = self._dot.feed(bytes(self._buf))
        self._buf.clear()
        if result.bare:
            r = reply("closing.bare_lf", host=self.settings.hostname)
            self._reset_transaction(r)
            self._send(r)
            self._close()
            return True
        self._account(result.body)
        if not result.done:
            return True
        self._buf += result.rest
        self._finish_message()
        return True

    def _finish_message(self) -> None:
        env = self.envelope
        self.state = _COMMAND
        if self._too_big or env is None:
            r = reply("size.exceeded", limit=self.settings.max_message_size)
            self._reset_transaction(r)
            self._send(r)
            return
        self._body_open = False
        self._decide(ev.MessageEnd(env, self._body_size))

    def _read_chunk(self) -> bool:
        chunk = self._chunk
        assert chunk is not None
        buf = self._buf
        if chunk.remaining and not buf:
            return False
        # Only this chunk's octets are copied out, and the buffer loses them from its
        # front (cheap for a bytearray): copying the whole input for each chunk made a
        # pipelined megabyte of "BDAT 0" cost seconds of CPU (quadratic).
        take = min(chunk.remaining, len(buf))
        data = bytes(buf[:take])
        del buf[:take]
        chunk.remaining -= take
        if not self._chunk_sink:
            self._account(data)
        if chunk.remaining:
            return True
        self.state = _COMMAND
        self._chunk = None
        if self._chunk_sink:
            self._chunk_sink = False
            r, self._send_later = self._send_later, None
            if r is not None:
                self._refuse("BDAT", r)
            return True
        if self._too_big:
            r = reply("size.exceeded", limit=self.settings.max_message_size)
            self._reset_transaction(r)
            self._refuse("BDAT", r)
            return True
        if self._chunk_last:
            self._finish_message()
        else:
            self._send(reply("bdat.chunk", size=self._body_size))
        return True


def _b64(text: str) -> bytes | None:
    """Strict base64 (no whitespace, no other characters), or None."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _too_long(limit: int) -> str:
    """The refusal of a line over ``limit``: RFC 4954 4 gives SASL lines their own."""
    return "auth.too_long" if limit == MAX_AUTH_LINE else "syntax.too_long"
