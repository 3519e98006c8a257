"""The delivery interface the server calls after the data, and what it hands over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import Reply


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """Everything the Received: header says about where a message came from."""

    session_id: str  # also the message id in the 250 reply and the logs
    helo: str
    client_ip: str
    reverse_name: str | None
    hostname: str  # this server's name
    protocol: str  # RFC 3848: ESMTP, ESMTPS, ESMTPA, ESMTPSA, SMTP, UTF8SMTP, UTF8SMTPS ...
    tls_version: str | None = None
    tls_cipher: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome for one recipient: ``reply`` is 250 when its copy is durable.

    ``action`` says what a success was, for a NOTIFY=SUCCESS report (RFC 3464 2.3.3):
    "delivered" into a mailbox or to a program, "relayed" to an MTA without DSN,
    "expanded" to several addresses, or "" when the next MTA was given the DSN
    parameters and reports itself.

    ``remote_mta`` and ``remote_reply``: where a downstream (LMTP, smarthost) gave
    the verdict, its name and its own reply, for a report's Remote-MTA and
    Diagnostic-Code fields (RFC 3464 2.3.5, 2.3.6); empty when the reply is ours.
    """

    recipient: Recipient
    reply: Reply
    action: str = "delivered"
    remote_mta: str = ""
    remote_reply: str = ""

    @property
    def ok(self) -> bool:
        return self.reply.code < 400

    def for_recipient(self, recipient: Recipient) -> RecipientResult:
        """The same outcome, told of ``recipient`` (the RCPT a routed copy stands for).
        Not dataclasses.replace: this is on every message's way to its 250, and
        replace() costs several times a plain construction."""
        return RecipientResult(
            recipient, self.reply, self.action, self.remote_mta, self.remote_reply
        )


class SpoolReader(Protocol):
    """The message as spooled: trace headers then the body, CRLF line ends."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def no_bare_cr(self) -> bool:
        """True when every CR and LF of the message is a CRLF's (it came through DATA,
        which refuses a bare one or mends a bare LF); BDAT data is taken as it came."""
        ...

    def held(self) -> bytes | None:
        """The whole message when it is small and held in memory (no file yet), else None."""
        ...

    def read_head(self, limit: int) -> bytes:
        """The first ``limit`` octets (a report quotes the header from them)."""
        ...


class Delivery(Protocol):
    """Stores or hands off one message; returns a result for each envelope recipient,
    and may add one for each address an alias expanded to that failed (its own
    recipient then, RFC 3461 6.2.7.3).

    A 250 result means durable: fsync'ed at its destination or accepted downstream.
    It must never raise: every failure becomes a 4xx/5xx result from the catalogue.
    """

    async def deliver(
        self, envelope: Envelope, trace: TraceInfo, spool: SpoolReader
    ) -> list[RecipientResult]: ...


class Destination(Protocol):
    """One place mail can go (Maildir, mbox, pipe, LMTP, smarthost), chosen by the router.

    ``recipients`` are the final addresses after alias expansion, deduplicated, with
    local parts in lower case and without +detail for local domains.  Returns one
    result per recipient, in the same order.  Like :class:`Delivery` it must never
    raise, and 250 means durable.
    """

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]: ...
