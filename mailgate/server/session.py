"""One SMTP session: an asyncio.Protocol that moves bytes and drives the engine.

The session does no SMTP itself.  It feeds received bytes to the sans-I/O
:class:`~mailgate.protocol.connection.Connection`, answers the engine's decision
events by awaiting the policy, the authenticator and the delivery, writes the spool
file as body chunks arrive, runs the timers, and flushes the engine's output once per
pipelined group (whenever the engine needs more input).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ipaddress
import itertools
import math
import os
import shutil
import socket
import time
from typing import TYPE_CHECKING, cast

from mailgate.auth.mechanisms import Challenge, Success
from mailgate.delivery.base import RecipientResult, TraceInfo
from mailgate.delivery.spool import reply_for_os_error
from mailgate.delivery.submission import HEAD_LIMIT, missing_fields
from mailgate.delivery.trace import protocol_name, received_header
from mailgate.ops.logging import SessionLog, debug_enabled, enter_session
from mailgate.policy.base import Client, Verdict
from mailgate.policy.networks import is_trusted
from mailgate.policy.pregreet import TAG as PREGREET
from mailgate.protocol import events as ev
from mailgate.protocol.connection import Connection, Settings
from mailgate.protocol.envelope import Address, Envelope
from mailgate.protocol.replies import Reply, reply
from mailgate.server.outcome import combine_results
from mailgate.server.proxy import ProxyError, parse_proxy
from mailgate.tls import describe

if TYPE_CHECKING:
    from mailgate.auth.mechanisms import SaslExchange
    from mailgate.delivery.spool import SpoolFile
    from mailgate.server.context import IPAddress, ListenerContext, ServerContext

# Stop reading from a client whose unprocessed input passes this (it is pipelining
# while we wait on a slow policy or delivery); resume once the engine caught up.
_HIGH_WATER = 1 << 20
LINGER = 15.0  # seconds a session we end reads on (discarding) before it closes
# Octets of data a read must have brought since the last restart of data_timeout to
# restart it again: 1 KiB in 3 minutes is 6 octets a second, slower than any link.
DATA_PROGRESS = 1024
HALF_CLOSED_DELAY = 2.0  # the most a deliberate delay lasts after the client's FIN
# Lines a session may log about its commands (HELO, MAIL, RCPT, refusals) before the
# rest go at "debug": an EHLO or an RCPT past max_recipients is a line of its own
# and not an error that ends the session, so a client could turn a few bytes of
# input into ten times as much log.  The lines of its messages (a stored one's
# message and delivery lines), connect, close, TLS, AUTH, policy refusals (check=)
# and errors are never held back (see log_event).
LOG_LINES_PER_SESSION = 500
_ALWAYS_LOGGED = frozenset(
    ("auth", "connect", "close", "delivery", "error", "pregreet", "quarantine", "spool",
     "timeout", "tls")
)
# A PROXY v2 header says its own length, up to 16 + 65,535 octets with its TLVs (a
# balancer's TLS and unique-id TLVs run to hundreds); the parser bounds v1 to 107.
PROXY_HEADER_MAX = 16 + 0xFFFF


def _random_start() -> itertools.count[int]:
    return itertools.count(int.from_bytes(os.urandom(4), "big"))


# Session ids count on from a random start, drawn again in every forked worker: no two
# sessions of one process share an id (with 32 random bits each, two sessions of the
# same second got the same id about once a day at 300 connections a second), other
# processes and restarts start far away, and there is no getrandom() system call per
# connection.
_session_ids = _random_start()


def _restart_session_ids() -> None:
    global _session_ids
    _session_ids = _random_start()


os.register_at_fork(after_in_child=_restart_session_ids)


def new_session_id() -> str:
    """Sortable by time, unique across restarts and instances: 8 hex of seconds, then 8
    hex of this process's session counter."""
    return f"{int(time.time()):08x}{next(_session_ids) & 0xFFFFFFFF:08x}"


class Session(asyncio.Protocol):
    # Slots: an idle session should cost a few KB (ten thousand of them wait at once).
    __slots__ = (
        "_auth_failed", "_auth_mechanism", "_busy", "_deadline", "_draining", "_eof",
        "_event_loop", "_exchange", "_lingering", "_log_lines", "_lost", "_message_id",
        "_message_started", "_messages", "_origin", "_paused", "_proxy_buf", "_received",
        "_spool",
        "_spool_failure", "_stopping", "_task", "_timed_out", "_trace_info", "_trace_len",
        "_waiter", "_write_paused",
        "admitted", "client", "conn", "listener", "log", "server", "sid", "transport",
    )  # fmt: skip

    def __init__(
        self, server: ServerContext, listener: ListenerContext,
        origin: tuple[IPAddress, int, bool] | None = None,
    ) -> None:
        """``origin``: the client of a connection its listener has already admitted
        (and read a PROXY header of): see server/tls_accept.py."""
        self.server = server
        self.listener = listener
        self.sid = new_session_id()
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.client: Client | None = None
        self.log: SessionLog | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # loop time at which the current wait times out
        self._origin = origin
        self.admitted = origin is not None  # counted in the server's connection limits
        self._paused = False
        self._received = 0  # octets read from the client (data_timeout's progress)
        # The transport's output is above its high-water mark: a client that sends
        # commands without reading the replies; no more are read or answered until
        # it has read them (else its replies would pile up in memory without bound).
        self._write_paused = False
        self._lingering = False  # our last reply is sent; the client's input is dropped
        self._lost = False  # the connection is gone: nothing more can be sent
        # The client half-closed (or closed: the two look alike until we write): no
        # more input, but what it sent is still answered, as RFC 5321 4.1.1.10 expects
        # of a client that sends QUIT and reads the replies to EOF.
        self._eof = False
        self._timed_out = False
        self._draining = False  # SIGTERM: 421 once between transactions
        self._stopping = False  # the shutdown grace is over: 421 at the next safe point
        self._busy = False
        self._proxy_buf = b""
        self._spool: SpoolFile | None = None
        self._spool_failure: Reply | None = None  # why the message's spool was dropped
        self._trace_info: TraceInfo | None = None  # of the message being received
        self._trace_len = 0  # octets of the Received: field at the head of its spool
        self._exchange: SaslExchange | None = None
        self._auth_mechanism = ""
        self._auth_failed: list[tuple[str, str]] | None = None  # (user, mechanism), 535s
        self._messages = 0
        self._log_lines = 0  # of those LOG_LINES_PER_SESSION counts
        self._message_id = ""  # of the latest message, once there is one (see message_id)
        self._message_started = 0.0
        self._task: asyncio.Task[None] | None = None
        # Kept: each asyncio.get_running_loop() is a getpid() system call (its fork
        # check), and a session asked for the loop at every wait for input.
        self._event_loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        peer = self._origin or transport.get_extra_info("peername")
        if not peer:
            # Reset before it was accepted: the address can no longer be read (uvloop
            # asks the socket only now).  No session for it, rather than one run for
            # 0.0.0.0 through the policy, the limits and the logs.
            SessionLog(self.sid, listener=self.listener.name).event("connect", outcome="reset")
            transport.abort()
            return
        if self._origin is not None:
            ip, port, known = self._origin
        else:
            (ip, port), known = client_address(peer), True
        sock = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        self.client = Client(
            ip=ip,
            port=port,
            local_ip=_ip(sock[0]),
            session_id=self.sid,
            listener=self.listener.config.role,
            address_known=known,
        )
        if self.listener.implicit_tls:
            self._note_tls(transport)
        loop = self._event_loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self.server.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # what a client sends after our last reply is dropped
        self._received += len(data)
        conn = self.conn
        if conn is None:
            self._proxy_buf += data
        else:
            conn.receive_data(data)
            if conn.buffered > _HIGH_WATER and not self._paused and self.transport:
                self.transport.pause_reading()
                self._paused = True
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None and not self._paused:
            self.transport.pause_reading()
            self._paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()  # the loop goes on, and reads again once it needs data

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self._lingering:
            return False  # our last reply is out and the client is done: close now
        # Kept open for our replies to what the client sent before its FIN; closed
        # by _cleanup once they are written.  A TLS transport cannot stay half-open:
        # asyncio shuts it down after the client's FIN or close_notify and drops
        # what is written meanwhile, so nothing more can be said (_lost).
        if self.client is not None and self.client.tls:
            self._lost = True
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()
        if self._lingering:
            self.server.release(self)

    # -- control from the server ------------------------------------------------------

    def request_drain(self) -> None:
        """SIGTERM: 421 as soon as no transaction is open, so an idle session (a peer
        caching its connection) does not hold the shutdown up while a message under
        way is still finished."""
        self._draining = True
        if not self._busy:
            self._wake()

    def request_shutdown(self) -> None:
        """SIGTERM deadline: 421 at the next safe point (never in the middle of a verdict
        or a delivery, so a message that is being stored still gets its answer)."""
        self._stopping = True
        if not self._busy:
            self._wake()

    def abandon(self) -> asyncio.Task[None] | None:
        """The shutdown's last step, for a session still busy past its grace and the
        wait after it (a delivery that does not end): the process ends with its
        message untaken, and the client hears 421 rather than a bare close (RFC 5321
        3.8), whatever was pending.  Returns the session's task, cancelled: its end
        kills what it waited for (a mailer) and logs the message aborted."""
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.shutdown()
            self._flush()
        if self._task is not None:
            self._task.cancel()
        return self._task

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _input_waiter(self, deadline: float) -> asyncio.Future[None]:
        """The future to await for more input: done on data, EOF, close, or once the
        loop's clock passes ``deadline``.

        A plain function handing out the future (not a coroutine awaiting it), and
        the timeout checked by the server's one sweep (ServerContext.watch_deadlines)
        rather than a timer per session: an idle session then keeps no frame and no
        timer of its own, which counts when ten thousand of them wait at once.
        """
        self._deadline = deadline
        self.server.watch_deadlines()
        assert self._event_loop is not None
        waiter = self._waiter = self._event_loop.create_future()
        return waiter

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: time out a wait whose deadline has passed."""
        if self._waiter is not None and now >= self._deadline:
            self._timed_out = True
            self._wake()

    # -- the session ------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.client is not None and self.transport is not None
        server = self.server
        listener = self.listener
        try:
            if (
                listener.config.proxy_protocol
                and self._origin is None  # (else its listener has read the header)
                and not await self._read_proxy_header()
            ):
                return
            self.log = SessionLog(self.sid, ip=ip_text(self.client.ip), listener=listener.name)
            enter_session(self.sid)
            # (a PROXY header without the client's address: the balancer's stands in)
            unknown = {} if self.client.address_known else {"proxy": "no_client_address"}
            self.log.event("connect", port=self.client.port, tls=self.client.tls, **unknown)
            server.metrics.connection_opened(listener.name)
            if listener.implicit_tls:  # counted and logged as a STARTTLS handshake is
                self._log_tls()
            if server.authenticator is not None:
                # a changed users file can change the mechanisms this EHLO offers
                await server.authenticator.refresh()
            settings = listener.settings
            if server.normalize_bare_lf(self.client.ip):
                settings = listener.settings_normalized
            self.conn = Connection(settings)
            # Implicit TLS (RFC 8314): the session is encrypted from its first byte.
            self.conn.tls_active = self.listener.implicit_tls
            if self._proxy_buf:
                self.conn.receive_data(self._proxy_buf)
                self._proxy_buf = b""
            assert self._event_loop is not None
            asked = self._event_loop.time()  # (the greeting pause counts from here)
            refusal = None if self.admitted else server.admit(self)
            if refusal is not None:  # a connection limit: logged and counted as refusals are
                self.log_event("refused", command="connect", code=refusal.code,
                               enhanced=refusal.enhanced, reason=refusal.name)
                server.metrics.rejection(refusal.name or str(refusal.code))
            else:
                verdict = await server.policy.connect(self.client)
                refusal = verdict.reply
                if refusal is not None or verdict.tags:
                    self._log_verdict("connect", verdict)
            if refusal is not None:
                self.conn.refuse(self._closing(refusal))
            else:
                await self._greet_pause(since=asked)
                if self._stopping or self._draining:  # no 220 to take back
                    self.conn.shutdown()
                else:
                    self.conn.greet()
            await self._loop()
        except Exception as exc:  # the last guard: a bug must not kill the server
            if self.log:
                self.log.event("error", level="error", error=repr(exc)[:300])
            if self.conn is not None and not self.conn.closed:
                self.conn.shutdown(reply("closing.internal", host=server.hostname))
                self._flush()
        finally:
            self._cleanup()

    async def _greet_pause(self, since: float) -> None:
        """server.greet_pause: hold the greeting back from an untrusted client of a
        public listener and note whether it talked meanwhile (policy/pregreet.py
        refuses its MAIL).  The pause counts from ``since``, when the connect checks
        began: time spent on them (a DNSBL zone that does not answer) is part of it,
        not added to it."""
        pause = self.server.config.server.greet_pause
        client = self.client
        conn = self.conn
        assert client is not None and conn is not None
        if pause <= 0 or client.trusted or self.listener.config.role != "public":
            return
        assert self._event_loop is not None
        await self._sleep(since + pause - self._event_loop.time(), until_eof=True)
        # (an EOF ends the pause early, but what the client sent first still counts:
        # a half-close must not be a way round the pregreet refusal)
        if conn.buffered and not self._lost:
            client.tags[PREGREET] = str(conn.buffered)
            self.log_event("pregreet", octets=conn.buffered)

    async def _sleep(self, seconds: float, until_eof: bool = False) -> None:
        """A deliberate delay (greeting pause, HELO delay, tarpit, AUTH failure delay)
        that a client hanging up, or a shutdown, ends early: the session's connection
        slot is not held for a gone client.  A closed socket and a half-closed one
        look the same until a write, so after the client's FIN a delay lasts at most
        HALF_CLOSED_DELAY more: a client that pipelines its guesses and shuts its side
        is still slowed (not answered at once), and a gone one holds its slot only
        that long.  ``until_eof`` (the greeting pause, where what the client sent
        first is noted all the same) ends at the FIN.  Bytes that arrive wake the wait
        too, which then goes on."""
        loop = self._event_loop
        assert loop is not None
        end = loop.time() + seconds
        while (
            not (self._lost or (until_eof and self._eof) or self._stopping or self._draining)
            and (left := end - loop.time()) > 0
        ):
            if self._eof and left > HALF_CLOSED_DELAY:
                end = loop.time() + HALF_CLOSED_DELAY
                continue
            self._deadline = math.inf  # the server's timeout sweep leaves this wait alone
            waiter = self._waiter = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)
            self._waiter = None

    async def _loop(self) -> None:
        conn = self.conn
        assert conn is not None
        settings = self.server.config.server
        loop = self._event_loop
        assert loop is not None
        # command_timeout runs per command, not per read: a client trickling a byte at a
        # time (slowloris) must still finish each command line in time.  It restarts when
        # the engine acted (an event or a reply).  In the data, data_timeout restarts at
        # each read (RFC 5321 4.5.3.2.5 times a data block) that brought DATA_PROGRESS
        # octets since it last did: a byte sent just before each timeout held a session
        # (and its place in the connection limits) for ever.
        deadline = 0.0
        data_deadline = 0.0  # 0: not in the data (yet)
        data_mark = 0  # self._received at data_deadline's last restart
        acted = True
        while True:
            if self._write_paused and not (conn.closed or self._lost):
                # (command_timeout: a client that never reads is let go in time)
                await self._input_waiter(loop.time() + settings.command_timeout)
                self._waiter = None
                if self._timed_out:
                    in_data = conn.in_data  # (before the timeout ends the transaction)
                    conn.timeout()
                    self.log_event("timeout", in_data=in_data, unread_replies=True)
                continue
            event = conn.next_event()
            if event is ev.NEED_DATA:
                acted = self._flush() or acted
                if conn.closed or self._lost or self._eof:
                    return  # (after EOF only a partial command can be left: dropped)
                if self._stopping or (self._draining and conn.between_transactions):
                    conn.shutdown()
                    continue
                if self._timed_out:
                    in_data = conn.in_data  # (before the timeout ends the transaction)
                    conn.timeout()
                    self.log_event("timeout", in_data=in_data)
                    continue
                if self._paused and self.transport is not None and not self._write_paused:
                    self._paused = False
                    self.transport.resume_reading()
                if acted:
                    deadline = loop.time() + settings.command_timeout
                    acted = False
                if not conn.in_data:
                    data_deadline = 0.0
                elif not data_deadline or self._received - data_mark >= DATA_PROGRESS:
                    data_deadline = loop.time() + settings.data_timeout
                    data_mark = self._received
                await self._input_waiter(data_deadline or deadline)
                self._waiter = None
                continue
            acted = True
            if event is not ev.SEND_FIRST and not isinstance(event, ev.BodyChunk):
                data_deadline = 0.0  # (a message's start or end: its data times anew)
            if event is ev.SEND_FIRST:
                # A long run the engine answered alone, or pipelined decisions: its
                # replies leave now (a client that does not read them pauses us at
                # the transport's high-water mark), and other sessions get a turn.
                self._flush()
                await asyncio.sleep(0)
                continue
            if isinstance(event, ev.BodyChunk):
                self._write_body(event.data)
                continue
            if self._lost or (isinstance(event, ev.MessageEnd) and self._tls_half_closed()):
                # Nobody left to answer (a reset; a TLS client that half-closed, which
                # asyncio's TLS cannot answer): what is still buffered is not acted on.
                # Above all a message is not delivered whose 250 cannot arrive: its
                # client retries it, and the first copy would be a duplicate.
                return
            self._busy = True
            try:
                await self._dispatch(event)
            finally:
                self._busy = False

    async def _dispatch(self, event: object) -> None:
        conn = self.conn
        client = self.client
        assert conn is not None and client is not None
        server = self.server
        if isinstance(event, ev.Helo):
            await self._on_helo(event)
        elif isinstance(event, ev.MailFrom):
            await self._on_mail(event.envelope)
        elif isinstance(event, ev.RcptTo):
            verdict = await server.policy.rcpt(client, event.envelope, event.recipient)
            self._log_verdict("rcpt", verdict, quiet=True, to=str(event.recipient.address))
            await self._answer(verdict)
        elif isinstance(event, ev.DataStart):
            await self._on_data_start(event.envelope)
        elif isinstance(event, ev.MessageEnd):
            await self._on_message_end(event.envelope, event.size)
        elif isinstance(event, ev.MessageAborted):
            self._drop_spool()
            if event.abandoned:  # the client's choice, not an error to count or slow
                self.log_event("message", outcome="abandoned")
                return
            self.log_event("message", outcome="refused", code=event.reply.code,
                           enhanced=event.reply.enhanced)
            server.metrics.message("refused", event.reply.code, event.reply.enhanced, 0)
            await self._tarpit(event.reply)
        elif isinstance(event, ev.Rejected):
            await self._refused(event.command, event.reply, event.counted)
        elif isinstance(event, ev.StartTLS):
            await self._on_starttls()
        elif isinstance(event, ev.AuthStart):
            await self._on_auth_start(event)
        elif isinstance(event, ev.AuthResponse):
            await self._auth_step(event.data)
        elif isinstance(event, ev.AuthAborted):
            self._log_auth_aborted()
        elif isinstance(event, ev.Verify):
            addr = event.address
            # RFC 5321 3.5.1: a 250 names the mailbox, domain and all (a bare user name
            # is one of the domain a bare <Postmaster> is in)
            domain = addr.domain or getattr(server.mailboxes, "postmaster_domain", "") or (
                server.hostname
            )
            mailbox = Address(addr.local, domain, addr.quoted)
            if not server.mailboxes.has_recipient(addr.local, addr.domain):
                # counted towards max_errors as any refusal is, so logged and slowed
                # as one: a client probing for addresses must not go unseen
                refusal = reply("vrfy.unknown", address=mailbox)
                conn.reject(refusal)
                await self._refused("VRFY", refusal, counted=True)
            elif str(mailbox).isascii():
                conn.accept(reply("vrfy.ok", address=mailbox))
            else:  # (reply text is ASCII: 252 rather than a mailbox with "?" in it)
                conn.accept(reply("vrfy.cannot"))
        elif isinstance(event, ev.Closed):
            self._flush()

    # -- stages -----------------------------------------------------------------------

    async def _on_helo(self, event: ev.Helo) -> None:
        client = self.client
        assert client is not None
        verdict = await self.server.policy.helo(client, event.name)
        # the name the client gives and the one DNS confirms for it, side by side
        rdns = {"rdns": client.reverse_name} if client.reverse_name else {}
        self._log_verdict("helo", verdict, name=event.name, extended=event.extended, **rdns)
        if verdict.accepted:
            client.helo = event.name
            delay = self.server.config.server.helo_delay
            if delay > 0 and not client.trusted and client.listener == "public":
                await self._sleep(delay)  # upas -D: slow down the spam cannons (port 25)
        elif verdict.reply is not None and verdict.reply.code < 500:
            verdict = Verdict(self._closing(verdict.reply), close=True, tags=verdict.tags)
        await self._answer(verdict)

    def _closing(self, refusal: Reply) -> Reply:
        """A refusal as the greeting and HELO may give it: RFC 5321 4.3.2 lists 554
        (or 550 to HELO) and 421 there, no other 4xx; a temporary one (a policy step
        that failed: 451) becomes 421 and the session ends."""
        if refusal.code >= 500 or refusal.code == 421:
            return refusal
        return reply("closing.internal", host=self.server.hostname)

    async def _on_mail(self, envelope: Envelope) -> None:
        client = self.client
        conn = self.conn
        assert client is not None and conn is not None
        auth = self.server.authenticator
        sender = envelope.sender
        if (
            conn.authenticated
            and auth is not None
            and sender is not None
            # <> too: only a user whose senders list "*" may send bounces
            and not auth.may_send_as(conn.authenticated, str(sender))
        ):
            r = reply("auth.sender_not_owned", address=str(sender), user=conn.authenticated)
            self.log_event("mail", sender=str(sender), code=r.code, enhanced=r.enhanced,
                           check="sender_owner", reason="not_owned", user=conn.authenticated)
            await self._answer(Verdict(r))
            return
        client.filter_state = "TRUSTED" if client.trusted else "ACCEPT"
        verdict = await self.server.policy.mail(client, envelope)
        self._log_verdict("mail", verdict, quiet=True, sender=str(sender),
                          size=envelope.declared_size, mime=envelope.body)
        await self._answer(verdict)

    async def _on_data_start(self, envelope: Envelope) -> None:
        client = self.client
        conn = self.conn
        assert client is not None and conn is not None
        verdict = await self.server.policy.data(client, envelope)
        if not verdict.accepted or verdict.tags:  # an accepted DATA is in the message line
            self._log_verdict("data", verdict, rcpts=len(envelope.recipients))
        if not verdict.accepted:
            await self._answer(verdict)
            return
        self._messages += 1
        self._message_id = f"{self.sid}.{self._messages}"
        self._message_started = time.monotonic()
        self._spool_failure = None
        try:
            self._spool = self.server.spool.create(self.message_id)
        except OSError as exc:
            self._spool_failed(exc)
            conn.reject(self._spool_failure or reply("delivery.storage"))
            return
        # The DATA reader refuses a bare CR; BDAT data is taken as it comes.
        self._spool.no_bare_cr = not envelope.chunked
        conn.accept()
        # The Received: field is made while the 354 travels: the data it goes before
        # is read only after this (the session takes its next event once done here).
        self._reply_now()
        # Nothing in it can change before the end of the data (no RCPT after a BDAT,
        # no TLS or AUTH mid-message): the delivery reuses it.
        self._trace_info = self._trace(envelope)
        received = received_header(self._trace_info, envelope)
        self._trace_len = len(received)
        self._write_body(received)  # (an error: logged, and the end of the data has 4xx)

    async def _on_message_end(self, envelope: Envelope, size: int) -> None:
        conn = self.conn
        client = self.client
        spool = self._spool
        assert conn is not None and client is not None
        server = self.server
        if spool is None:  # the spool could not be written (logged when it failed)
            self._storage_failed(envelope, size)
            return
        try:
            spool.close()
            if self.listener.config.role != "public" or is_trusted(client):
                # our own users' mail (RFC 6409 8): the fields a message must have
                head = spool.read_head(HEAD_LIMIT)
                added = missing_fields(head, self.message_id, server.hostname,
                                       whole=len(head) >= spool.size)
                if added:
                    spool.insert(self._trace_len, added)
        except OSError as exc:
            self._spool_failed(exc)
            self._storage_failed(envelope, size)
            return
        verdict = await server.policy.message(client, envelope, spool)
        if not verdict.accepted:
            self._log_verdict("message", verdict, size=size)
            self._dispose_refused(verdict, spool)
            self._spool = None
            server.metrics.message("refused", verdict.reply.code, verdict.reply.enhanced, size)
            await self._answer(verdict)
            return
        trace = self._trace_info or self._trace(envelope)
        results = await server.delivery.deliver(envelope, trace, spool)
        final = await combine_results(self, envelope, results, spool)
        elapsed = time.monotonic() - self._message_started
        if final.code < 400:
            conn.accept(final)
        else:
            # The destinations failed it: no refusal of the client's doing, so neither
            # counted towards max_errors nor tarpitted.
            self._drop_spool()
            conn.reject(final, counted=False)
        self._reply_now()
        server.metrics.delivery_latency(elapsed)
        self._log_delivery(envelope, results, final, size, elapsed)
        outcome = "accepted" if final.code < 400 else "tempfail" if final.code < 500 else "refused"
        server.metrics.message(outcome, final.code, final.enhanced, size)
        if final.code < 400:
            # NOTIFY=SUCCESS reports go out after the 250 has left: the message is
            # stored, and its client need not wait for the report's own delivery (one
            # more fsync, or a smarthost's round trips).  The session takes its next
            # command once the report is done, so a shutdown still waits for it.
            self._flush()
            await server.notify_success(self, envelope, results, spool)
            self._drop_spool()
        self._count_replies()  # once a message and at the end, not a metrics call per reply

    def _dispose_refused(self, verdict: Verdict, spool: SpoolFile) -> None:
        """BLOCKED mail: discarded, or kept in the quarantine directory (upas -s)."""
        tags = dict(verdict.tags)
        target = tags.get("quarantine_dir") if tags.get("disposition") == "quarantine" else None
        if target:
            try:
                os.makedirs(target, exist_ok=True)
                shutil.move(spool.path, os.path.join(target, self.message_id))
                self.log_event("quarantine", path=os.path.join(target, self.message_id))
            except OSError as exc:
                self.log_event("quarantine", level="error", error=str(exc)[:200])
        spool.discard()

    async def _on_starttls(self) -> None:
        conn = self.conn
        transport = self.transport
        assert conn is not None and transport is not None
        ctx = self.server.tls.server_context() if self.server.tls else None
        if ctx is None:
            conn.reject(reply("starttls.unavailable"))
            return
        conn.accept()
        self._flush()
        loop = asyncio.get_running_loop()
        try:
            # Awaited directly (not wrapped in a task by wait_for) so that start_tls
            # switches the transport to TLS before any further byte reaches us.
            async with asyncio.timeout(self.server.config.server.command_timeout):
                new_transport = await loop.start_tls(transport, self, ctx, server_side=True)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.log_event("tls", outcome="failed", error=str(exc)[:200] or type(exc).__name__)
            self.server.metrics.tls("failed", "")
            self._lost = True
            transport.abort()
            conn.shutdown(reply("closing.internal", host=self.server.hostname))
            conn.data_to_send()  # nothing can be sent on a failed handshake
            return
        if new_transport is None:
            self._lost = True
            return
        self.transport = new_transport
        conn.tls_started()
        self._note_tls(new_transport)
        assert self.client is not None
        self.client.auth_user = None
        self._log_tls()

    def _log_tls(self) -> None:
        """A handshake done (STARTTLS, or port 465's before the session began)."""
        client = self.client
        assert client is not None
        self.log_event("tls", outcome="ok", version=client.tls_version, cipher=client.tls_cipher)
        self.server.metrics.tls("ok", client.tls_version or "")

    def _tls_half_closed(self) -> bool:
        """Whether a TLS client has shut its side (a FIN, a close_notify): asyncio's
        TLS then drops what we write and tells us only once it has given up on the
        connection, too late for a message whose data came with the FIN.  Its socket
        knows at once: a peek there reads the end of the stream."""
        client = self.client
        transport = self.transport
        if client is None or not client.tls or transport is None:
            return False
        raw = transport.get_extra_info("socket")
        if raw is None:
            return False
        try:
            # (a duplicate of the descriptor: uvloop's socket object has no recv)
            with socket.socket(fileno=os.dup(raw.fileno())) as sock:
                return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # nothing pending: the client is still there
        except OSError:
            return True  # reset, or gone

    def _note_tls(self, transport: asyncio.BaseTransport) -> None:
        client = self.client
        assert client is not None
        client.tls = True
        version, cipher = describe(transport.get_extra_info("ssl_object"))
        client.tls_version = version or None
        client.tls_cipher = cipher or None

    async def _on_auth_start(self, event: ev.AuthStart) -> None:
        conn = self.conn
        client = self.client
        auth = self.server.authenticator
        assert conn is not None and client is not None
        if auth is None:
            conn.auth_failure(reply("auth.unknown_mech"))
            return
        refusal = await auth.check_throttle(str(client.ip))
        if refusal is not None:
            self.log_event("auth", mechanism=event.mechanism, outcome="throttled")
            self.server.metrics.auth(event.mechanism, "throttled")
            conn.auth_failure(refusal, close=refusal.code == 421)
            return
        # After the check, which may have picked up a users file without the stored
        # form this mechanism needs (the EHLO that offered it came before).
        if event.mechanism not in auth.mechanisms:
            conn.auth_failure(reply("auth.unknown_mech"))
            return
        self._exchange = auth.start(event.mechanism, str(client.ip))
        self._auth_mechanism = event.mechanism
        await self._auth_step(event.initial)

    async def _auth_step(self, data: bytes | None) -> None:
        conn = self.conn
        client = self.client
        exchange = self._exchange
        assert conn is not None and client is not None
        mech = self._auth_mechanism
        if exchange is None:
            conn.auth_failure(reply("auth.bad_response"))
            return
        outcome = await exchange.step(data)
        if isinstance(outcome, Challenge):
            conn.auth_challenge(outcome.data)
            return
        self._exchange = None
        auth = self.server.authenticator
        if isinstance(outcome, Success):
            client.auth_user = outcome.user
            conn.auth_success(outcome.user)
            self.log_event("auth", mechanism=mech, outcome="ok", user=outcome.user)
            self.server.metrics.auth(mech, "ok")
            if self._auth_failed and auth is not None:
                auth.forgive_fallback(str(client.ip), outcome.user, self._auth_failed)
            # Taken back once: a second success (after STARTTLS, which forgets the
            # first) must not take them back again, or one valid account could wipe
            # out the address's count of its guesses at others in every session.
            self._auth_failed = None
            return
        # the name tried is part of the story (one user guessed from many addresses)
        tried = {"user": exchange.user} if exchange.user is not None else {}
        self.log_event("auth", mechanism=mech, outcome="failed", code=outcome.reply.code,
                       reason=outcome.reply.name or "", **tried)
        self.server.metrics.auth(mech, "failed")
        if outcome.reply.name == "auth.failed" and exchange.user:
            self._auth_failed = [*(self._auth_failed or ()), (exchange.user, mech)]
        if auth is not None:
            # the larger of the address's and the claimed user's counts: guessing one
            # user's password from many addresses slows down too
            delay = auth.failure_delay(str(client.ip), exchange.user)
            if delay > 0:
                await self._sleep(delay)
        conn.auth_failure(outcome.reply)

    def _log_auth_aborted(self, reason: str | None = None) -> None:
        """An exchange that ended without an answer to check: the client's "*" or a
        malformed response (``reason`` None), or the session's end."""
        tried = self._exchange.user if self._exchange is not None else None
        self._exchange = None
        mechanism = self._auth_mechanism or "?"
        self.log_event("auth", mechanism=mechanism, outcome="aborted",
                       **({"user": tried} if tried is not None else {}),
                       **({"reason": reason} if reason else {}))
        self.server.metrics.auth(mechanism, "aborted")

    # -- helpers ------------------------------------------------------------------------

    @property
    def message_id(self) -> str:
        # made once per message: the delivery, its log lines and its reply all ask
        return self._message_id or f"{self.sid}.{self._messages}"

    @property
    def message_arrival(self) -> datetime.datetime:
        """When the current message's data began to arrive (a report's Arrival-Date)."""
        ago = time.monotonic() - self._message_started
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)

    def _trace(self, envelope: Envelope) -> TraceInfo:
        client = self.client
        conn = self.conn
        assert client is not None and conn is not None
        return TraceInfo(
            session_id=self.message_id,
            helo=envelope.helo,
            client_ip=ip_text(client.ip),
            reverse_name=client.reverse_name,
            hostname=self.server.hostname,
            protocol=protocol_name(
                envelope.extended, client.tls, conn.authenticated is not None, envelope.smtputf8
            ),
            tls_version=client.tls_version,
            tls_cipher=client.tls_cipher,
        )

    async def _answer(self, verdict: Verdict) -> None:
        conn = self.conn
        assert conn is not None
        if verdict.tags:
            for key, value in verdict.tags:
                if key == "greylist":
                    self.server.metrics.greylist(value)
        if verdict.reply is None:
            conn.accept()
            return
        conn.reject(verdict.reply, close=verdict.close)
        self.server.metrics.rejection(verdict.reply.name or str(verdict.reply.code))
        await self._tarpit(verdict.reply)

    async def _refused(self, command: str, refusal: Reply, counted: bool) -> None:
        """A refusal of a command's own (not a policy verdict's): logged, counted in
        the metrics and, when max_errors counts it, tarpitted."""
        self.log_event("refused", command=command, code=refusal.code,
                       enhanced=refusal.enhanced)
        self.server.metrics.rejection(refusal.name or str(refusal.code))
        if counted:
            await self._tarpit(refusal)

    async def _tarpit(self, refusal: Reply) -> None:
        """9front's growing delay: the nth refusal waits delay * 2**(n-1) seconds.
        Only for a permanent refusal, the kind max_errors counts: a temporary one
        (greylisting, say) a legitimate MTA may meet for each of many recipients."""
        conn = self.conn
        settings = self.server.config.server
        if conn is None or settings.tarpit_delay <= 0 or conn.closed or refusal.code < 500:
            return
        n = max(conn.errors, 1)
        # The refusal (and the replies queued before it in a pipelined group) leaves
        # now: the delay holds up what comes next, not the answers already decided.
        self._flush()
        await self._sleep(min(settings.tarpit_delay * 2 ** (n - 1), settings.tarpit_max_delay))

    def _write_body(self, data: bytes) -> None:
        spool = self._spool
        if spool is None:
            return
        try:
            spool.write(data)
        except OSError as exc:
            # Keep reading the data (the engine does); the end of data answers 4xx.
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError) -> None:
        """The message's spool failed (a full disk, say): logged with the message's id
        at once, its reply kept for the end of the data."""
        self.log_event("spool", level="error", id=self.message_id, error=str(exc)[:200])
        self._spool_failure = reply_for_os_error(exc)
        self._drop_spool()

    def _storage_failed(self, envelope: Envelope, size: int) -> None:
        """The end of a message whose spool failed: 452 for a full disk or quota, 451
        for any other error, and the message line every message gets."""
        final = self._spool_failure or reply("delivery.storage")
        assert self.conn is not None
        self.conn.reject(final)
        self.log_event(
            "message", id=self.message_id, sender=str(envelope.sender), size=size,
            rcpts=len(envelope.recipients), code=final.code, enhanced=final.enhanced,
            reason="spool",
        )
        self.server.metrics.message("tempfail", final.code, final.enhanced, size)

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def _reply_now(self) -> None:
        """Send the replies decided so far at once if the client is waiting for them
        (nothing more of its input is buffered: it is not pipelining), so that the
        work left after a decision (log lines, metrics, the next message's set-up) is
        done while the reply travels and the client writes its next command, rather
        than before.  On one connection sending a message at a time that is the
        difference between a server's whole CPU and its decisions alone in each round
        trip (bench/RESULTS.md, "The eleventh session").  A pipelining client's
        replies still go in one write per group (RFC 2920), at its end."""
        conn = self.conn
        if conn is not None and not conn.buffered:
            self._flush()

    def _flush(self) -> bool:
        """Send the engine's output; whether there was any."""
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None:
            return False
        out = conn.data_to_send()
        if out and not transport.is_closing():
            transport.write(out)
        return bool(out)  # (a closed session's transport is closed by _cleanup)

    async def _read_proxy_header(self) -> bool:
        """PROXY v1/v2 from an allowed load balancer: the proxied address becomes the
        client for policy, logs and Received.  Anything else closes the connection."""
        client = self.client
        transport = self.transport
        assert client is not None and transport is not None

        def refuse(reason: str, answer: bool = False, closing: str = "closing.proxy") -> bool:
            # logged: an operator must be able to tell why a balancer's clients fail
            SessionLog(self.sid, ip=ip_text(client.ip), listener=self.listener.name).event(
                "proxy", level="warning", outcome="refused", reason=reason[:200])
            if answer:
                transport.write(reply(closing, host=self.server.hostname).to_bytes())
            transport.close()
            return False

        if not self.server.proxy_allowed(client.ip):
            return refuse("not an address of server.proxy_from")
        deadline = time.monotonic() + self.server.config.server.command_timeout
        while True:
            try:
                header = parse_proxy(self._proxy_buf)
            except ProxyError as exc:
                return refuse(str(exc), answer=True)
            if header is not None:
                break
            if self._lost or self._eof:
                return refuse("closed before the whole header")
            if self._draining or self._stopping:
                # no transaction yet: told at once, as an idle session is, rather
                # than held (and the shutdown with it) for the whole grace period
                return refuse("server shutting down", answer=True, closing="closing.shutdown")
            if len(self._proxy_buf) > PROXY_HEADER_MAX:
                return refuse("header longer than PROXY v2 allows", answer=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return refuse("no whole header within command_timeout")
            await self._input_waiter(asyncio.get_running_loop().time() + remaining)
            self._waiter = None
        self._proxy_buf = self._proxy_buf[header.consumed :]
        if header.local:
            client.address_known = False  # (the balancer's own: never trusted)
        else:
            client.ip = _ip(str(header.source_ip))
            client.port = header.source_port
        return True

    def log_event(self, name: str, /, level: str = "info", **fields: object) -> None:
        log = self.log
        if log is None:
            return
        # (AUTH attempts and policy refusals, "check=", are bounded by the throttle
        # and max_errors, and are what monitoring such as fail2ban reads)
        if name not in _ALWAYS_LOGGED and "check" not in fields and not (
            name == "message" and "id" in fields
        ):
            self._log_lines += 1
            if self._log_lines > LOG_LINES_PER_SESSION and level != "error":
                if self._log_lines == LOG_LINES_PER_SESSION + 1:
                    log.event("log_limited", level="warning", lines=LOG_LINES_PER_SESSION)
                level = "debug"
        log.event(name, level=level, **fields)

    def _log_verdict(
        self, stage: str, verdict: Verdict, /, quiet: bool = False, **fields: object
    ) -> None:
        """One line for a stage's verdict.  With ``quiet`` (MAIL, RCPT) a plain
        acceptance goes at "debug": the message line names the sender and the delivery
        lines each recipient, so at "info" those lines were repeats that cost a tenth
        of a message's CPU.  Refusals, tags (greylist, DNSBL) and an unusual filter
        state stay at "info"."""
        client = self.client
        state = client.filter_state if client is not None else "ACCEPT"
        unusual = state not in ("ACCEPT", "TRUSTED")
        plain = verdict.reply is None and not verdict.tags and not unusual
        if quiet and plain and not debug_enabled():
            return  # (before the fields are filled in: two of these per message)
        level = "debug" if quiet and plain else "info"
        if verdict.reply is not None:
            fields["code"] = verdict.reply.code
            fields["enhanced"] = verdict.reply.enhanced
        for key, value in verdict.tags:
            fields[key] = value
        if unusual:
            fields["filter"] = state
        if self.conn is not None:
            # Logged before the reply is queued: count the refusal being logged too.
            errors = self.conn.errors + (1 if verdict.reply and verdict.reply.code >= 500 else 0)
            if errors:
                fields["errors"] = errors
        self.log_event(stage, level=level, **fields)

    def _log_delivery(
        self, envelope: Envelope, results: list[RecipientResult], final: Reply, size: int,
        elapsed: float,
    ) -> None:
        for result in results:
            if result.ok and result.remote_reply:  # handed on: where, and its queue id
                self.log_event(
                    "delivery", id=self.message_id, to=str(result.recipient.address),
                    code=result.reply.code, enhanced=result.reply.enhanced,
                    relay=result.remote_mta, downstream=result.remote_reply[:300],
                )
            elif result.ok:
                self.log_event(
                    "delivery", id=self.message_id, to=str(result.recipient.address),
                    code=result.reply.code, enhanced=result.reply.enhanced,
                )
            else:  # why, on the session's own line (the downstream's words included)
                self.log_event(
                    "delivery", id=self.message_id, to=str(result.recipient.address),
                    code=result.reply.code, enhanced=result.reply.enhanced,
                    reply=" / ".join(result.reply.lines)[:300],
                    # which next hop said so, where one did
                    **({"relay": result.remote_mta} if result.remote_mta else {}),
                )
        self.log_event(
            "message", id=self.message_id, sender=str(envelope.sender), size=size,
            rcpts=len(envelope.recipients), code=final.code, enhanced=final.enhanced,
            seconds=round(elapsed, 4),
        )

    def _count_replies(self) -> None:
        if self.conn is not None:
            self.server.metrics.replies(self.conn.take_replies_sent())

    def _cleanup(self) -> None:
        if self._spool is not None and self.conn is not None and self.conn.quit:
            # QUIT between BDAT chunks: the client's choice, as an RSET there is
            self.log_event("message", id=self.message_id, outcome="abandoned")
        elif self._spool is not None:  # data under way: the message is not taken
            reason = ("shutdown" if self._stopping else "timeout" if self._timed_out
                      else "connection lost")
            self.log_event("message", id=self.message_id, outcome="aborted", reason=reason)
        self._drop_spool()
        if self._exchange is not None:
            # An AUTH cut off at a challenge: it counted towards the address's
            # failures when it began, so it has its line, as each AUTH has.
            reason = ("shutdown" if self._stopping else "timeout" if self._timed_out
                      else "connection lost")
            self._log_auth_aborted(reason)
        if self.client is not None and self.client.name_lookup is not None:
            self.client.name_lookup.cancel()  # a client gone before HELO
        self._count_replies()
        server = self.server
        server.sessions.discard(self)
        if self.log is not None:
            self.log_event("close", messages=self._messages,
                           errors=self.conn.errors if self.conn else 0)
            server.metrics.connection_closed(self.listener.name)
        transport = self.transport
        if transport is not None and self._write_paused:
            transport.abort()  # close() would wait for a reader that never reads
        elif transport is not None and not transport.is_closing():
            self._close_transport(transport)
        if not self._lingering:
            server.release(self)
        # (else once the connection is closed: a session lingering for its client's
        # FIN holds a descriptor, and counts in the connection limits while it does,
        # or a client could hold thousands past max_connections for LINGER seconds)

    def _close_transport(self, transport: asyncio.Transport) -> None:
        """Close after our last reply.  Where the client may still be sending (we end
        the session: a 521 for a bare LF in the middle of its data, a 421), first
        half-close and read on, discarding, for up to LINGER seconds: closed with its
        data unread, the connection would be reset and our reply lost with it."""
        conn = self.conn
        # Not for a client refused at connect or gone quiet before HELO: it sends no
        # data to lose a reply in, and a flood of such connections must not hold a
        # descriptor each for LINGER seconds.
        loop = self._event_loop
        assert loop is not None
        # close() waits for our last replies to be read, which a client that keeps its
        # window shut never does: at LINGER, what is still unsent is dropped (the
        # descriptor, and a lingering session's place in the limits, held for ever).
        # (A timer only where replies wait: one per closed connection would keep
        # tens of thousands of transports alive on a busy server.)
        if (
            conn is None or conn.quit or conn.helo is None or self._lost or self._eof
            or not transport.can_write_eof()
        ):
            transport.close()
            if transport.get_write_buffer_size():
                loop.call_later(LINGER, transport.abort)
            return
        self._lingering = True
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        loop.call_later(LINGER, transport.abort)


def client_address(peer: tuple[object, ...]) -> tuple[IPAddress, int]:
    """A socket's peer address, as (address object, port)."""
    return _ip(str(peer[0])), int(cast(int, peer[1])) if len(peer) > 1 else 0


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A peer address as an address object (cached: the same clients come back, and
    parsing and printing addresses were ~2.5 % of the CPU on one-message connections)."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return ipaddress.IPv4Address("0.0.0.0")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``str(ip)``, cached for the same reason (it is in every log line and header)."""
    return str(ip)


__all__ = ["Session", "Settings", "new_session_id"]
