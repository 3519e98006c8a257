"""Sender domain verification at MAIL: the domain must exist and accept mail.

A domain exists when DNS holds an MX, A or AAAA record for it.  A null MX (RFC 7505:
one MX, preference 0, exchange ".") says the domain sends no mail it could take
bounces for, so its mail is refused with RFC 7505's 550 5.7.27.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from mailgate.config.names import parse_literal
from mailgate.policy.base import ACCEPT, Client, Step, Verdict
from mailgate.policy.dns import Answer, Resolver, Status
from mailgate.policy.networks import is_trusted
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.replies import reply


class Domain(enum.Enum):
    EXISTS = "exists"
    MISSING = "missing"
    NULL_MX = "null_mx"
    TEMPFAIL = "tempfail"


class SenderDomainStep(Step):
    """Refuses MAIL from domains that do not exist or take no mail (untrusted clients)."""

    name = "sender"

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        sender = envelope.sender
        # <> (bounces) must always be accepted (RFC 5321 4.5.5); a domainless sender has
        # nothing to look up.
        if sender is None or sender.is_null or not sender.domain or is_trusted(client):
            return ACCEPT
        domain = sender.domain_lower
        if sender.is_literal:  # names an address, not a domain: only its syntax matters
            state = Domain.MISSING if parse_literal(domain) is None else Domain.EXISTS
        else:
            state = await self.classify(domain)
        if state is Domain.EXISTS:
            return ACCEPT
        name = {
            Domain.MISSING: "sender.domain_missing",
            Domain.NULL_MX: "sender.null_mx",
            Domain.TEMPFAIL: "sender.dns_tempfail",
        }[state]
        tags = (("check", self.name), ("reason", state.value))
        return Verdict(reply(name, domain=domain), tags=tags)

    async def classify(self, domain: str) -> Domain:
        """What DNS says of ``domain`` as a mail domain.

        The three lookups go out together, and the answer is given as soon as it is
        known: an MX, or an NXDOMAIN (which is for the name, whatever the type),
        does not wait for the other lookups to time out on a slow server.
        """
        lookups = {
            rdtype: asyncio.ensure_future(self._resolver.lookup(domain, rdtype))
            for rdtype in ("MX", "A", "AAAA")
        }
        try:
            pending = set(lookups.values())
            while pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                mx = lookups["MX"]
                if mx.done() and mx.result().status is Status.FOUND:
                    return Domain.NULL_MX if _is_null_mx(mx.result()) else Domain.EXISTS
                if any(t.done() and t.result().status in (Status.NXDOMAIN, Status.INVALID)
                       for t in lookups.values()):
                    return Domain.MISSING
        finally:
            for task in lookups.values():
                task.cancel()
        return _classify(*(task.result() for task in lookups.values()))


def _classify(mx: Answer, a: Answer, aaaa: Answer) -> Domain:
    """The domain as its three answers say, all in."""
    answers = (mx, a, aaaa)
    if mx.status is Status.FOUND and _is_null_mx(mx):
        return Domain.NULL_MX
    if any(answer.status is Status.FOUND for answer in answers):
        return Domain.EXISTS
    # NXDOMAIN is authoritative even when another query failed; INVALID names
    # (empty labels, over-long names) cannot exist at all.
    if any(answer.status in (Status.NXDOMAIN, Status.INVALID) for answer in answers):
        return Domain.MISSING
    if any(answer.status is Status.TEMPFAIL for answer in answers):
        return Domain.TEMPFAIL
    return Domain.MISSING  # the name exists but holds no mail records at all


def _is_null_mx(answer: Answer) -> bool:
    """RFC 7505's "MX 0 .", or MX records that all name the root whatever their
    preference ("MX 10 ."): no host takes mail there, so a bounce could never
    arrive (Postfix refuses such a domain as a malformed MX)."""
    records: tuple[Any, ...] = answer.records
    return bool(records) and all(r.exchange.to_text() == "." for r in records)
