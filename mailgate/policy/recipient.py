"""Recipient checks at RCPT: local users, and relay control (upas ``forwarding``).

Only trusted networks and authenticated clients may relay.  Everyone else may send only
to local recipients, and a local part that still routes somewhere (``user%remote``,
``remote!user``, ``"user@remote"``) is a relay attempt however local its domain looks:
a downstream mailer could honour the route, so it is never treated as local delivery.
"""

from __future__ import annotations

from mailgate.config.names import parse_literal
from mailgate.policy.base import ACCEPT, Client, Mailboxes, Step, Verdict
from mailgate.policy.networks import is_trusted, unmap
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply, reply

ROUTING_CHARACTERS = frozenset("%!@")


class RecipientStep(Step):
    """Accepts local users and, for clients that may relay, remote addresses."""

    name = "rcpt"

    def __init__(self, mailboxes: Mailboxes, hostname: str, allow_loopback_literal: bool) -> None:
        self._mailboxes = mailboxes
        # The domain of local forms without one of ours (a bare local part, user@[],
        # user@[our address]): the mailboxes' own (the host name when it is a local
        # domain, else the first local domain: mx.example.org serves example.org).
        self._home = getattr(mailboxes, "postmaster_domain", "") or hostname
        self._allow_loopback = allow_loopback_literal
        # A site's own Mailboxes may have no downstream to ask, nor say whether it
        # relays (then it is taken to: the behaviour before it could say).
        self._verify = getattr(mailboxes, "verify_recipient", None)
        self._can_relay = getattr(mailboxes, "can_relay", None)
        self._why_not = getattr(mailboxes, "recipient_refusal", None)

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict:
        address = recipient.address
        # RFC 5321 4.5.1: <Postmaster> without a domain is ours, whoever asks (no
        # relay check); refused only if it has no mailbox (the start-up warned), as
        # accepting it would only fail it after the data.
        if not address.domain and address.local.lower() == "postmaster":
            # (the mailboxes know whose postmaster it is: the host name's domain
            # when it is local, else the first local domain)
            if self._mailboxes.has_recipient("postmaster", ""):
                return ACCEPT
            return self._refuse("rcpt.unknown", "unknown", address)
        may_relay = is_trusted(client)
        if not may_relay and ROUTING_CHARACTERS.intersection(address.local):
            return self._refuse("rcpt.relay_denied", "route_in_local_part", address)
        given = address.domain_lower
        domain = self._local_domain(client, address, given)
        if domain is None:
            if address.domain == "[]":
                return self._refuse("rcpt.loopback_disabled", "loopback", address)
            if not may_relay:
                return self._refuse("rcpt.relay_denied", "relay", address)
            if self._can_relay is not None and not self._can_relay():
                # Accepted now, it could only fail after the data (and take the local
                # recipients of the same message down with it): say so here.
                return self._refuse("rcpt.no_route", "no_route", address)
            # (the relay's destination may be a mailbox we write, which not every
            # address can name: the same reason, said now rather than after the data)
            why = self._why_not(address.local, address.domain) if self._why_not else None
            if why is not None:
                return Verdict(why, tags=(("check", self.name), ("reason", "bad_mailbox")))
            return ACCEPT
        why = self._refusal(address.local, domain)
        if why is not None and why.name == "rcpt.bad_mailbox":
            return Verdict(why, tags=(("check", self.name), ("reason", "bad_mailbox")))
        if why is not None and why.name != "rcpt.unknown":
            # our configuration's fault (logged by the router): the sender retries
            return Verdict(why, tags=(("check", self.name), ("reason", "route_error")))
        if why is not None:
            return self._refuse("rcpt.unknown", "unknown", address)
        verify = self._verify
        if verify is not None:
            downstream = await verify(address.local, domain)
            if downstream is False:
                return self._refuse("rcpt.unknown", "downstream_unknown", address)
            if downstream is None:
                return self._refuse("delivery.downstream_rcpt_temp", "downstream_tempfail", address)
            if isinstance(downstream, Reply):  # the downstream's own refusal, as it said
                reason = "downstream_refused" if downstream.code >= 500 else "downstream_tempfail"
                return Verdict(downstream, tags=(("check", self.name), ("reason", reason)))
        if given and domain != given:
            # user@[our address] (or user@[]) is local mail: make it user@ our home
            # domain, or delivery, which knows no addresses, would hand it to the relay.
            recipient.address = Address(address.local, domain, address.quoted)
        return ACCEPT

    def local_forms(self, client: Client, address: Address) -> list[Address]:
        """The other spellings of a local recipient, as routing reads them: in our
        home domain for user@[our address] and user@[], then with the local part as
        looked up (lower case, a +detail suffix dropped); none when ``address`` is not
        local.  What the access list's recipient rules are matched against too, so
        that no other spelling of a refused address gets through."""
        domain = self._local_domain(client, address, address.domain_lower)
        if domain is None:
            return []
        canonical = getattr(self._mailboxes, "canonical_user", None)
        local = canonical(address.local, domain) if canonical else address.local.lower()
        forms = [Address(address.local, domain, address.quoted), Address(local, domain)]
        return [form for form in dict.fromkeys(forms) if form != address]

    def _refusal(self, local: str, domain: str) -> Reply | None:
        """Why the local recipient has no mailbox, or None: the router says why (one
        routing); a site's Mailboxes without recipient_refusal only whether."""
        if self._why_not is not None:
            return self._why_not(local, domain)
        if self._mailboxes.has_recipient(local, domain):
            return None
        return reply("rcpt.unknown", address=f"{local}@{domain}")

    def _local_domain(self, client: Client, address: Address, domain: str) -> str | None:
        """The local domain ``address`` (whose domain in lower case is ``domain``) is
        delivered in, or None when it is not local."""
        if not domain:
            return self._home  # a domainless local part, as upas: a local user
        if domain == "[]":
            return self._home if self._allow_loopback else None
        if address.is_literal:
            literal, local_ip = parse_literal(domain), client.local_ip
            if literal is not None and local_ip is not None and unmap(literal) == unmap(local_ip):
                return self._home  # user@[our address] is local mail
        return domain if self._mailboxes.is_local_domain(domain) else None

    def _refuse(self, name: str, why: str, address: Address) -> Verdict:
        return Verdict(reply(name, address=address), tags=(("check", self.name), ("reason", why)))
