"""The policy interface the server calls at each stage of a session.

A policy answers with a :class:`Verdict`: accept (no reply), or a reply from the
catalogue.  The server never decides on its own; a site can plug in its own policy by
implementing :class:`Policy`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Protocol

from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class Client:
    """What policy (and the trace headers) know about the client of one session."""

    ip: IPAddress
    port: int = 0
    local_ip: IPAddress | None = None
    session_id: str = ""
    listener: str = "public"  # the listener's role: public, submission or smtps
    reverse_name: str | None = None  # PTR name, when looked up
    # the lookup of reverse_name while it runs (started at connect, awaited at HELO)
    name_lookup: asyncio.Future[str | None] | None = None
    helo: str = ""
    tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    auth_user: str | None = None
    trusted: bool = False  # set by the policy at connect (trusted networks)
    # False when a PROXY header gave no client address (a balancer's health check, a
    # Unix-socket frontend): the balancer's own address stands in for the client, and
    # is never trusted for it (as 127.0.0.1 would be: relaying for anyone)
    address_known: bool = True
    filter_state: str = "ACCEPT"  # upas filter state of the current transaction
    tags: dict[str, str] = field(default_factory=dict)  # extra key=value pairs for the log


@dataclass(frozen=True, slots=True)
class Verdict:
    """Accept when ``reply`` is None; otherwise send ``reply``.

    ``close``: hang up after the reply (the reply must then be a 421 or 521/554 closing
    reply from the catalogue).  ``tags`` go into the session's log line.
    """

    reply: Reply | None = None
    close: bool = False
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def accepted(self) -> bool:
        return self.reply is None


ACCEPT = Verdict()


class Spooled(Protocol):
    """Read access to a spooled message body (see ``mailgate.delivery.spool``)."""

    @property
    def size(self) -> int: ...

    def read_head(self, limit: int) -> bytes: ...


class Policy(Protocol):
    """One method per stage; each may be slow (DNS, Redis) and must never raise."""

    async def connect(self, client: Client) -> Verdict: ...

    async def helo(self, client: Client, name: str) -> Verdict: ...

    async def mail(self, client: Client, envelope: Envelope) -> Verdict: ...

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict: ...

    async def data(self, client: Client, envelope: Envelope) -> Verdict: ...

    async def message(self, client: Client, envelope: Envelope, body: Spooled) -> Verdict: ...


class Mailboxes(Protocol):
    """What policy needs to know of local mail (implemented by the delivery router)."""

    def is_local_domain(self, domain: str) -> bool: ...

    def has_recipient(self, local: str, domain: str) -> bool:
        """Does ``local@domain`` have a mailbox?  An empty ``domain`` is RFC 5321's
        bare ``<Postmaster>``: the postmaster of the domain the site says."""
        ...

    def can_relay(self) -> bool:
        """Is there a way out (a relay) for mail to domains that are not local?"""
        ...

    async def verify_recipient(self, local: str, domain: str) -> bool | Reply | None:
        """Would the downstream take it?  True; False (no such mailbox); a Reply (the
        downstream's own refusal, e.g. a full mailbox); or None for "cannot say now"."""
        ...

    def recipient_refusal(self, local: str, domain: str) -> Reply | None:
        """Why a recipient in a local domain has no mailbox (``rcpt.unknown``, or a
        configuration error answered as it is), or None.  Optional: without it
        has_recipient decides, and a refusal is "user unknown"."""
        ...


class Step:
    """A policy step: accepts everything unless a subclass says otherwise.

    The policy engine runs its steps in order at each stage and stops at the first
    verdict that is not an accept.  A site's own step subclasses this and overrides
    only the stages it cares about.
    """

    name = "step"

    async def connect(self, client: Client) -> Verdict:
        return ACCEPT

    async def helo(self, client: Client, name: str) -> Verdict:
        return ACCEPT

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        return ACCEPT

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict:
        return ACCEPT

    async def data(self, client: Client, envelope: Envelope) -> Verdict:
        return ACCEPT

    async def message(self, client: Client, envelope: Envelope, body: Spooled) -> Verdict:
        return ACCEPT
