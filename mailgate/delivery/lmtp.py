"""Hand-off to an LMTP server (RFC 2033), e.g. Dovecot, with one result per recipient.

The client says LHLO, MAIL FROM (with BODY=8BITMIME / SMTPUTF8 / SIZE / DSN
parameters when the envelope needs them and the server offers them; without
SMTPUTF8 a domain in U-labels goes as A-labels), one RCPT per
recipient (pipelined when PIPELINING is offered), then DATA with the spooled message
dot-stuffed chunk by chunk, and reads one reply per accepted recipient.

How a partial refusal reaches the SMTP client
---------------------------------------------
SMTP has one reply for the whole message after the data, LMTP one per recipient.
If some recipients are stored and others refused, no single SMTP reply is true: a
250 would claim the refused ones were delivered, a 4xx makes the client resend to
the stored ones (duplicates).  mailgate avoids the mixed case and handles what is
left of it:

1. **Recipients are verified at RCPT time.**  :meth:`LMTPDestination.verify_recipient`
   asks the LMTP server (MAIL FROM:<>, RCPT TO, RSET over one cached connection);
   the policy answers the client's RCPT with 550 for a recipient the downstream
   refuses, and 451 when it cannot tell.  So an unknown user never reaches DATA.
2. **What still fails after the data** (quota, a storage error, a user removed in
   between) is reported per recipient.  When results are mixed the server answers
   250 and hands the failed recipients to :func:`mailgate.delivery.dsn.build_dsn`:
   a RFC 3464 failure report goes to the envelope sender, so every recipient either
   got the message or is named in a bounce; none is dropped silently, and no
   recipient is told 250 for a copy that was not stored.  With the null sender no
   bounce may be sent (RFC 5321 6.1), so a mixed result is answered with the
   failure reply instead: a duplicate is better than a loss.

Connection failures and timeouts give every recipient still without a final reply
451 4.4.0; recipients the server already answered 250 keep their success.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mailgate.config.delivery import LMTPConfig
from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.smtp_client import (
    ClientError,
    Connection,
    Outcomes,
    Response,
    content_refusal,
    declared_size,
    downstream_said,
    hold_back_if_deferred,
    recipient_failure,
    transaction_commands,
    wire_path,
    with_downstream_status,
)
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply, multiline, reply

log = logging.getLogger(__name__)


UNREACHABLE_FOR = 30.0  # seconds checks answer "cannot say now" after a failed one
VERIFIERS = 4  # connections recipient checks may use at once


class LMTPDestination:
    """Delivers by LMTP to ``config.address`` (``host:port`` or ``unix:/path``)."""

    def __init__(self, config: LMTPConfig, hostname: str) -> None:
        self._config = config
        self._hostname = hostname
        # Checks run over a few cached connections, one check per connection at a
        # time: with a single shared one, a recipient the server was slow to look up
        # held every other session's RCPT to this destination behind it.
        self._idle_verifiers: list[Connection] = []
        self._verifier_slots = asyncio.Semaphore(VERIFIERS)
        # After a check that could not reach the server: until this (monotonic) time
        # every check answers "cannot say now" at once, so with a server that hangs
        # a waiting RCPT does not sit through the timeouts of the checks before it.
        self._unreachable_until = 0.0
        self._last_answer = 0.0  # (monotonic) when the server last answered a check
        self._closed = False  # after aclose: a check still under way closes its connection

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        """One result per recipient; never raises."""
        if not recipients:
            return []
        outcomes = Outcomes()
        conn: Connection | None = None
        reports_itself = False  # took NOTIFY with the RCPT: its own DSNs, not ours
        try:
            conn = await self._connect()
            reports_itself = conn.supports("DSN")
            await self._transfer(conn, envelope, spool, recipients, outcomes)
            await conn.quit()
        except ClientError as e:
            log.warning("%s: LMTP to %s: %s", trace.session_id, self._config.address, e)
        except Exception:  # a bug must not lose the message: it is retried by the client
            log.exception("%s: LMTP to %s failed", trace.session_id, self._config.address)
        finally:
            if conn is not None:
                conn.abort()
        action = "" if reports_itself else "delivered"
        peer = conn.peer if conn is not None else ""
        return outcomes.results(recipients, reply("delivery.downstream_temp"), action, peer)

    async def _connect(self) -> Connection:
        conn = await Connection.open(self._config.address, self._config.timeout)
        resp = await conn.hello("LHLO", self._hostname)
        if not resp.ok:
            conn.abort()
            raise ClientError(f"LHLO refused: {resp.summary()}")
        return conn

    async def _transfer(
        self,
        conn: Connection,
        envelope: Envelope,
        spool: SpoolReader,
        recipients: list[Recipient],
        outcomes: Outcomes,
    ) -> None:
        """Runs the transaction, filling ``outcomes`` as replies come in."""
        everyone = range(len(recipients))
        # A UTF-8 local part cannot be named to a server without SMTPUTF8.  Dovecot
        # took such a sender and stored the message with Return-Path: <>, as a bounce
        # (no vacation reply, no report could reach the sender): the message fails.
        # Such a recipient fails alone, as any dead address of a list does.  UTF-8
        # header fields do go: this is the message's final mailbox, which stores them
        # as they are (refusing them would refuse most international mail to every
        # user of a Dovecot without SMTPUTF8).
        utf8 = conn.supports("SMTPUTF8")
        sender = envelope.sender
        refusal = None
        if not utf8 and sender is not None and not sender.local.isascii():
            refusal = reply("delivery.utf8_sender_unsupported")
        refusal = refusal or await content_refusal(conn, envelope, spool.path)
        if refusal is not None:
            outcomes.set(everyone, refusal)
            return
        named = [i for i in everyone if utf8 or recipients[i].address.local.isascii()]
        unnamed = [i for i in everyone if i not in named]
        if unnamed:
            outcomes.set(unnamed, reply("rcpt.utf8_unsupported"))
        if not named:
            return
        mail, rcpts = await conn.transaction(
            *transaction_commands(conn, envelope, await declared_size(conn, envelope, spool),
                                  [recipients[i] for i in named])
        )
        if not mail.ok:
            outcomes.set(named, _whole_message_failure(mail), mail)
            return
        accepted = []
        for i, resp in zip(named, rcpts, strict=True):
            if resp.ok:
                accepted.append(i)
            else:
                outcomes.set((i,), recipient_failure(recipients[i], resp), resp)
        if not accepted or await hold_back_if_deferred(outcomes, accepted):
            return
        refused = await conn.send_message(envelope, spool)
        if refused is not None:
            outcomes.set(accepted, _whole_message_failure(refused), refused)
            return
        # RFC 2033 4.2: one reply per accepted RCPT, in RCPT order (after BDAT LAST too).
        for i in accepted:
            resp = await conn.read_response(final=True)
            if resp.ok:
                outcomes.set((i,), reply("ok"), resp)  # (its words: the queue id)
            else:
                outcomes.set((i,), recipient_failure(recipients[i], resp), resp)

    async def verify_recipient(self, address: Address) -> bool | Reply | None:
        """Would the LMTP server accept mail for ``address``?

        True: it answered 2xx to RCPT; False: no such mailbox (5.1.x, or a 5xx
        without a status); a Reply: another refusal, in its own words and status (a
        full mailbox, 552 5.2.2, must not reach the client as "user unknown": a
        mailing list would unsubscribe the address); None: it could not say (the
        server is unreachable or did not answer in time), and the caller should
        answer 451.
        """
        if time.monotonic() < self._unreachable_until:
            return None
        async with self._verifier_slots:
            if time.monotonic() < self._unreachable_until:  # (found while we waited)
                return None
            started = time.monotonic()
            conn = self._take_idle_verifier()
            try:
                answer = await self._verify_once(conn, address)
            except ClientError as e:
                if conn is None or _timed_out(e):
                    return self._failed(address, e, started)
                # The cached connection may have been closed by the server since
                # (its idle timeout): one fresh try.  Not after a timeout, which a
                # fresh connection would only sit through again.
                try:
                    answer = await self._verify_once(None, address)
                except ClientError as e:
                    return self._failed(address, e, started)
            self._last_answer = time.monotonic()
            return answer

    def _take_idle_verifier(self) -> Connection | None:
        while self._idle_verifiers:
            conn = self._idle_verifiers.pop()
            if not conn.closing:
                return conn
            conn.abort()
        return None

    def _failed(self, address: Address, error: ClientError, started: float) -> None:
        log.warning("verifying <%s> by LMTP: %s", address, error)
        # A check that timed out while others were answered is one slow lookup (a
        # user database that is slow for this user), not a server to stop asking.
        if not (_timed_out(error) and self._last_answer > started):
            self._unreachable_until = (
                time.monotonic() + min(self._config.timeout, UNREACHABLE_FOR)
            )
        return None

    async def _verify_once(self, conn: Connection | None, address: Address) -> bool | Reply | None:
        """One check over ``conn`` (or a new connection), which goes back to the idle
        ones if it is still good; on ClientError it is closed."""
        try:
            if conn is None:
                conn = await self._connect()
            if not address.local.isascii() and not conn.supports("SMTPUTF8"):
                # no form of it the server could take (a domain has its A-labels):
                # RFC 6531's refusal, not "user unknown"
                self._release(conn, usable=True)
                return reply("rcpt.utf8_unsupported")
            utf8 = conn.supports("SMTPUTF8") and not str(address).isascii()
            mail, rcpts = await conn.transaction(
                "MAIL FROM:<> SMTPUTF8" if utf8 else "MAIL FROM:<>",
                [f"RCPT TO:{wire_path(address, utf8)}"],
            )
            rset = await conn.command("RSET")
        except BaseException:  # (a cancelled check too: its connection is in no state)
            if conn is not None:
                conn.abort()
            raise
        self._release(conn, usable=rset.ok)
        if not mail.ok or not rcpts:
            return None
        answer = rcpts[0]
        if answer.ok:
            return True
        status = answer.lines[0].split(" ", 1)[0] if answer.lines else ""
        if answer.permanent and (status.startswith("5.1.") or not status[:1].isdigit()):
            return False
        return recipient_failure(Recipient(address), answer)

    def _release(self, conn: Connection, usable: bool) -> None:
        """A check is done with ``conn``: back to the idle ones, or closed (after
        aclose, a check still under way must not refill a retired pool)."""
        if usable and not self._closed:
            self._idle_verifiers.append(conn)
        else:
            conn.abort()

    async def aclose(self) -> None:
        """Close the cached verification connections (at shutdown or retirement)."""
        self._closed = True
        idle, self._idle_verifiers = self._idle_verifiers, []
        for conn in idle:
            await conn.quit()


def _timed_out(error: ClientError) -> bool:
    return isinstance(error.__cause__, TimeoutError)


def _whole_message_failure(resp: Response) -> Reply:
    name = "delivery.downstream_perm" if resp.permanent else "delivery.downstream_temp"
    return with_downstream_status(multiline(name, downstream_said(resp)), resp)
