"""Routing: which destination gets each recipient, and delivery to each exactly once.

A local recipient (its local part in lower case, a +detail suffix dropped) is first
expanded by the aliases, recursively; an address already being expanded is taken as
a mailbox, which ends loops the way sendmail and Postfix do (``alice: alice, bob``
keeps a copy for alice).  A mailbox then goes to its per-user destination, else its
domain's, else the default.  Destinations that store into mailboxes (Maildir, mbox)
take only known users: local users and addresses with a per-user route; others go
to the domain's catch-all address or are unknown.  Recipients in other domains go
to the relay destination, if there is one.

All lookups are in memory: ``is_local_domain`` and ``has_recipient`` do no I/O.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from mailgate.config.names import dotted_key
from mailgate.delivery.base import Destination, RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.handoff import Agreement
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.idn import domain_key
from mailgate.protocol.replies import Reply, reply

log = logging.getLogger(__name__)

MAX_ALIAS_DEPTH = 20  # deeper nesting is a configuration error (451 4.3.0)
# Routes remembered per Router: a recipient is routed at RCPT (has_recipient, then
# verify_recipient) and again at delivery.  Bounded, since clients choose the keys.
ROUTE_CACHE_SIZE = 1024


@dataclass(frozen=True)
class RoutingTable:
    """The routing rules, already normalized: lower-case keys, and every local domain
    spelled as ``local_domains`` spells it."""

    # the local domain of the bare <Postmaster> recipient (RFC 5321 4.1.1.3), which
    # has none: the hostname when it is local, else the first local domain
    postmaster_domain: str
    # domain_key(domain) → the domain as configured (lower case): a recipient in
    # xn--bcher-kva.example is routed, stored and handed on as in bücher.example
    # when that is how the configuration names it, and the other way round
    local_domains: Mapping[str, str]
    default: str  # the destination of local mailboxes no other rule routes
    local_users: frozenset[str] = frozenset()
    relay: str = ""  # the destination of remote recipients; empty: refused
    delimiter: str = "+"  # characters that start an ignored +detail suffix
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # user or user@domain
    builtin_aliases: frozenset[str] = frozenset()  # of aliases: not configured (postmaster)
    users: Mapping[str, str] = field(default_factory=dict)  # user or user@domain → destination
    domains: Mapping[str, str] = field(default_factory=dict)  # domain → destination
    catch_all: Mapping[str, str] = field(default_factory=dict)  # domain → address
    # destinations that deliver only to known users (Maildir, mbox)
    mailbox_destinations: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Target:
    """One final delivery: a destination name and the address it delivers to."""

    destination: str
    address: Address

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.destination, self.address.local, domain_key(self.address.domain))


# refusals that hold as long as the routing table does (not configuration errors,
# which are logged each time they are met)
_KEPT_REFUSALS = frozenset(("rcpt.unknown", "rcpt.no_route", "rcpt.bad_mailbox"))


class _Refusal(Exception):
    def __init__(self, answer: Reply) -> None:
        super().__init__(answer.text)
        self.reply = answer


class Router:
    """The :class:`~mailgate.delivery.base.Delivery` and policy ``Mailboxes`` of mailgate."""

    def __init__(self, table: RoutingTable, destinations: Mapping[str, Destination]) -> None:
        self.table = table
        self.destinations = dict(destinations)
        # The table and destinations never change (a reload builds a new Router), so a
        # route, once found, holds for this Router's life.
        self._routes: dict[tuple[str, str, bool], tuple[Target, ...] | Reply] = {}
        # the destinations whose downstream can check a recipient at RCPT (LMTP)
        self._verifiers: dict[str, Callable[[Address], Awaitable[bool | Reply | None]]] = {
            name: check
            for name, destination in self.destinations.items()
            if (check := getattr(destination, "verify_recipient", None)) is not None
        }

    # --- policy.base.Mailboxes ----------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        return domain_key(domain) in self.table.local_domains

    def can_relay(self) -> bool:
        return bool(self.table.relay)

    @property
    def postmaster_domain(self) -> str:
        """Whose postmaster a bare <Postmaster> is: the host name's domain when it is
        local, else the first local domain (refusals name it for contact too)."""
        return self.table.postmaster_domain

    def has_recipient(self, local: str, domain: str) -> bool:
        if domain and not self.is_local_domain(domain):
            return False
        return not isinstance(self._route(local, domain, False), Reply)

    def recipient_refusal(self, local: str, domain: str) -> Reply | None:
        """Why a local recipient has no route: ``rcpt.unknown``, or a configuration
        error (aliases nested too deep: 451, not a 550 that tells the sender the
        address does not exist); None when it has one."""
        found = self._route(local, domain, False)
        return found if isinstance(found, Reply) else None

    def postmaster_problems(self) -> list[str]:
        """The local domains whose postmaster has no mailbox (RFC 5321 4.5.1: every
        domain we take mail for MUST have one), e.g. the built-in postmaster → root
        where root is no local user (system_users = false)."""
        aliases = self.table.aliases
        found = []
        for domain in dict.fromkeys(self.table.local_domains.values()):
            if self.has_recipient("postmaster", domain):
                continue
            key = next((k for k in (f"postmaster@{domain}", "postmaster")
                        if k in aliases and k not in self.table.builtin_aliases), None)
            hint = (f"no address of {dotted_key('delivery.aliases', key)} is a mailbox here" if key
                    else 'add an alias, e.g. [delivery.aliases] postmaster = "you"')
            found.append(f"postmaster@{domain} cannot be delivered (RFC 5321 4.5.1 "
                         f"requires it): {hint}")
        return found

    def alias_problems(self) -> list[str]:
        """Alias addresses and catch-all targets that lead to no mailbox (a local
        user misspelt, or gone): an alias delivers to its other addresses only, a
        catch-all takes nothing.  Warnings at start-up, reload and check-config."""
        table = self.table
        everywhere = list(dict.fromkeys(table.local_domains.values()))
        found = []
        for key, members in table.aliases.items():
            if key in table.builtin_aliases:  # (postmaster_problems says what to do)
                continue
            user, _, domain = key.partition("@")
            # an unqualified alias holds in every local domain, its addresses too
            for member in members:
                dead = [d for d in ([domain] if domain else everywhere)
                        if self._leads_nowhere(member, d, f"{user}@{d}")]
                if dead:
                    where = "" if domain or len(dead) == len(everywhere) else (
                        f" in {', '.join(dead)}")
                    found.append(f"{dotted_key('delivery.aliases', key)}: {member} is no mailbox "
                                 f"here{where}: mail to the alias skips it")
        for domain, target in table.catch_all.items():
            if self._leads_nowhere(target, domain, f"*@{domain}"):
                found.append(f"{dotted_key('delivery.catch_all', domain)}: {target} is no mailbox "
                             "here: the catch-all takes nothing")
        return found

    def _leads_nowhere(self, member: str, domain: str, owner: str) -> bool:
        try:
            self._member(member, domain, frozenset({owner}), 1)
        except _Refusal:
            return True
        return False

    async def verify_recipient(self, local: str, domain: str) -> bool | Reply | None:
        """Ask the downstream of each of the recipient's targets, where it can say.

        LMTP destinations check RCPT before the client is answered, so a downstream
        refusal reaches the client at RCPT rather than as a bounce later.  True: it
        accepts; False: no such mailbox; a Reply: refused otherwise (its words and
        status: a full mailbox); None: it could not say now (the caller answers 4xx).

        An alias of several addresses answers for the alias: refused only when every
        address is refused for good, accepted when one takes it.  A dead address among
        the live ones is its own failure at delivery, reported by itself (one bad
        member must not make the list "unknown" to everyone who writes to it).
        """
        targets = self._route(local, domain, False)
        if isinstance(targets, Reply):
            return False
        verdicts: list[bool | Reply | None] = []
        for target in targets:
            check = self._verifiers.get(target.destination)
            verdicts.append(True if check is None else await check(target.address))
        if True in verdicts:
            return True
        refused = [v for v in verdicts if v is False or (isinstance(v, Reply) and v.code >= 500)]
        if len(refused) == len(verdicts):
            return refused[0]
        # none accepts and one could not say: for now (a 4xx Reply, or None)
        return next(v for v in verdicts if v not in refused)

    async def aclose(self) -> None:
        """Close the destinations' cached connections (the LMTP verifier)."""
        for destination in self.destinations.values():
            close = getattr(destination, "aclose", None)
            if close is not None:
                await close()

    # --- routing ------------------------------------------------------------------

    def canonical_user(self, local: str, domain: str) -> str:
        """The lookup form of a local part in ``domain``: lower case, without a
        +detail suffix, unless the whole of it is a configured name (a local user
        john-smith, an alias mailer-daemon, with "-" as the delimiter), which is
        looked up first, as Postfix and sendmail do."""
        user = local.lower()
        cuts = [i for i in (user.find(c) for c in self.table.delimiter) if i > 0]
        if not cuts or self._known(user, domain):
            return user
        return user[: min(cuts)]

    def _known(self, user: str, domain: str) -> bool:
        table = self.table
        full = f"{user}@{domain}"
        return (
            user in table.local_users or user in table.aliases or user in table.users
            or full in table.aliases or full in table.users
        )

    def route(self, address: Address) -> list[Target] | Reply:
        """The final targets of one recipient, or the reply that refuses it."""
        targets = self._route(address.local, address.domain, address.quoted)
        return targets if isinstance(targets, Reply) else list(targets)

    def _route(self, local: str, domain: str, quoted: bool) -> tuple[Target, ...] | Reply:
        """:meth:`route` of that address, remembered: immutable, so callers share it."""
        key = (local, domain, quoted)
        known = self._routes.get(key)
        if known is not None:
            return known
        found = self._resolve(Address(local, domain, quoted))
        # A refusal for a configuration error is logged each time, so it is not kept.
        if not isinstance(found, Reply) or found.name in _KEPT_REFUSALS:
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                del self._routes[next(iter(self._routes))]  # the oldest
            self._routes[key] = found
        return found

    def _resolve(self, address: Address) -> tuple[Target, ...] | Reply:
        domain = self.table.local_domains.get(
            domain_key(address.domain or self.table.postmaster_domain)
        )
        if domain is None:
            if self.table.relay:
                return self._storable(address, (Target(self.table.relay, address),))
            return reply("rcpt.no_route", address=address)
        try:
            user = self.canonical_user(address.local, domain)
            targets = self._expand(user, domain, address.quoted, frozenset(), 0)
        except _Refusal as refusal:
            if refusal.reply.name == "rcpt.unknown":  # name the address the client gave
                return reply("rcpt.unknown", address=address)
            return refusal.reply
        detail = address.local[len(user):]
        if detail:
            targets = [self._with_detail(t, user, domain, detail) for t in targets]
        return self._storable(address, tuple({t.key: t for t in targets}.values()))

    def _storable(
        self, address: Address, targets: tuple[Target, ...]
    ) -> tuple[Target, ...] | Reply:
        """``targets``, or a refusal when a mailbox we would write (a Maildir, an mbox)
        cannot be named after one of them ("..", a "/"): refused at RCPT (553), not
        answered 250 there and 451 after the data, for ever."""
        for target in targets:
            check = getattr(self.destinations.get(target.destination), "address_problem", None)
            if check is not None and check(target.address):
                log.warning("no mailbox can be named after <%s> (%s)", target.address,
                            target.destination)
                return reply("rcpt.bad_mailbox", address=address)
        return targets

    def _with_detail(self, target: Target, user: str, domain: str, detail: str) -> Target:
        """The recipient itself handed on (LMTP, a smarthost, a mailer) keeps its
        +detail: Dovecot files alice+lists in its lists folder and Sieve sees it.  A
        mailbox we write ourselves, and an alias's addresses, go without it."""
        addr = target.address
        if (
            target.destination in self.table.mailbox_destinations
            or (addr.local, addr.domain) != (user, domain)
        ):
            return target
        return Target(target.destination, Address(user + detail, domain, addr.quoted))

    def _expand(
        self, user: str, domain: str, quoted: bool, chain: frozenset[str], depth: int
    ) -> list[Target]:
        if depth > MAX_ALIAS_DEPTH:
            log.error("aliases nest deeper than %d at %s@%s", MAX_ALIAS_DEPTH, user, domain)
            raise _Refusal(reply("delivery.misconfigured"))
        full = f"{user}@{domain}"
        aliases = self.table.aliases
        members = aliases.get(full) or aliases.get(user)
        if members and full not in chain:
            inner = chain | {full}
            # One address that leads nowhere (no such mailbox: a typo, a user gone)
            # must not refuse the list to everyone who writes to it, postmaster
            # included: the others get the mail.  The administrator is told at
            # start-up, at each reload and by check-config (alias_problems).
            found: list[Target] = []
            refused: list[_Refusal] = []
            for member in members:
                try:
                    found += self._member(member, domain, inner, depth + 1)
                except _Refusal as refusal:
                    refused.append(refusal)
            if not found:  # every address is dead: the alias is as they are
                raise refused[0]
            return found
        return self._mailbox(user, domain, quoted, chain, depth)

    def _member(self, target: str, domain: str, chain: frozenset[str], depth: int) -> list[Target]:
        """An alias or catch-all target: ``user`` (in ``domain``) or ``user@domain``."""
        local, _, target_domain = target.rpartition("@") if "@" in target else (target, "", "")
        if not target_domain:
            return self._expand(self.canonical_user(local, domain), domain, False, chain, depth)
        spelled = self.table.local_domains.get(domain_key(target_domain))
        if spelled is None:
            if not self.table.relay:
                log.error("alias target %s is remote and no relay is configured", target)
                raise _Refusal(reply("delivery.misconfigured"))
            return [Target(self.table.relay, Address(local, target_domain.lower()))]
        return self._expand(self.canonical_user(local, spelled), spelled, False, chain, depth)

    def _mailbox(
        self, user: str, domain: str, quoted: bool, chain: frozenset[str], depth: int
    ) -> list[Target]:
        table = self.table
        full = f"{user}@{domain}"
        destination = (
            table.users.get(full)
            or table.users.get(user)
            or table.domains.get(domain)
            or table.default
        )
        known = user in table.local_users or full in table.users or user in table.users
        if destination in table.mailbox_destinations and not known:
            catch_all = table.catch_all.get(domain)
            if catch_all and full not in chain:
                return self._member(catch_all, domain, chain | {full}, depth + 1)
            raise _Refusal(reply("rcpt.unknown", address=full))
        return [Target(destination, Address(user, domain, quoted))]

    # --- delivery.base.Delivery ---------------------------------------------------

    async def deliver(
        self, envelope: Envelope, trace: TraceInfo, spool: SpoolReader
    ) -> list[RecipientResult]:
        """Deliver to every final target once; a result per envelope recipient, and
        one per failed address of an alias that fanned out (_expanded_results)."""
        try:
            return await self._deliver(envelope, trace, spool)
        except Exception:
            log.exception("delivery of %s failed unexpectedly", trace.session_id)
            failed = reply("delivery.local_error")
            return [RecipientResult(rcpt, failed) for rcpt in envelope.recipients]

    async def _deliver(
        self, envelope: Envelope, trace: TraceInfo, spool: SpoolReader
    ) -> list[RecipientResult]:
        # destination → (target key → the Recipient handed to it): each target once
        plans: dict[str, dict[tuple[str, str, str], Recipient]] = {}
        routed: list[list[tuple[str, str, str]] | Reply] = []
        for rcpt in envelope.recipients:
            address = rcpt.address
            targets = self._route(address.local, address.domain, address.quoted)
            if isinstance(targets, Reply):
                routed.append(targets)
                continue
            keys = []
            # An alias of several addresses is reported "expanded" here (RFC 3461
            # 6.2.7.3): its addresses are not to report success again.
            notify = rcpt.notify if len(targets) == 1 else _expanded_notify(rcpt.notify)
            for t in targets:
                key = t.key
                plan = plans.setdefault(t.destination, {})
                known = plan.get(key)
                if known is None:
                    plan[key] = Recipient(t.address, notify, rcpt.orcpt)
                elif known.notify != notify or (known.orcpt is None and rcpt.orcpt):
                    # Two RCPTs for one mailbox, handed on once: with what either asked
                    # for, so that a downstream that reports itself loses neither.
                    plan[key] = Recipient(t.address, _merged_notify(known.notify, notify),
                                          known.orcpt or rcpt.orcpt)
                keys.append(key)
            routed.append(keys)
        names = list(plans)
        if len(names) == 1:  # the usual case: one destination needs no task of its own
            name = names[0]
            outcomes = [await self._run(name, envelope, trace, spool, list(plans[name].values()))]
        else:
            outcomes = await self._run_several(names, plans, envelope, trace, spool)
        done = {
            key: answer
            for name, answers in zip(names, outcomes, strict=True)
            for key, answer in zip(plans[name], answers, strict=True)
        }
        results: list[RecipientResult] = []
        for rcpt, r in zip(envelope.recipients, routed, strict=True):
            if isinstance(r, Reply):
                results.append(RecipientResult(rcpt, r))
            elif len(r) == 1:
                results.append(done[r[0]].for_recipient(rcpt))
            else:
                results += _expanded_results(rcpt, [done[k] for k in r])
        return results

    async def _run_several(
        self,
        names: list[str],
        plans: dict[str, dict[tuple[str, str, str], Recipient]],
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
    ) -> list[list[RecipientResult]]:
        """Several destinations, their results in ``names`` order.  Those that hand the
        message on (LMTP, smarthost, pipe), which may defer it, go first; when one did,
        the message is answered 4xx and comes again whole, so the mailboxes are not
        written to now: their copy would be a duplicate then."""
        def run(name: str) -> Awaitable[list[RecipientResult]]:
            return self._run(name, envelope, trace, spool, list(plans[name].values()))

        boxes = self.table.mailbox_destinations
        first = [n for n in names if n not in boxes]
        then = [n for n in names if n in boxes]
        # Several hand-offs agree before any sends the data (delivery.handoff).
        agreement = Agreement(len(first)) if len(first) > 1 else None
        handed = await asyncio.gather(
            *(agreement.run(functools.partial(run, n)) if agreement else run(n) for n in first)
        )
        results = dict(zip(first, handed, strict=True))
        deferred = any(r.reply.code < 500 and not r.ok for rs in results.values() for r in rs)
        if deferred:
            held = reply("delivery.held_back")
            results.update({n: [RecipientResult(r, held) for r in plans[n].values()] for n in then})
        else:
            results.update(zip(then, await asyncio.gather(*map(run, then)), strict=True))
        return [results[n] for n in names]

    async def _run(
        self,
        name: str,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        """One destination's results, one per recipient, whatever the destination does."""
        destination = self.destinations.get(name)
        try:
            if destination is None:
                raise LookupError(f"no destination named {name!r}")
            results = await destination.deliver(envelope, trace, spool, recipients)
            if len(results) != len(recipients):
                raise ValueError(f"{len(results)} results for {len(recipients)} recipients")
        except Exception:
            log.exception("destination %s failed for %s", name, trace.session_id)
            failed = reply("delivery.local_error")
            return [RecipientResult(r, failed) for r in recipients]
        return results


def _merged_notify(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """NOTIFY for a mailbox two RCPTs named: what either asked for (RFC 3461 4.1: none
    is FAILURE,DELAY), NEVER only when both said it."""
    if a == b:
        return a
    wanted = {n for notify in (a, b) for n in notify or ("FAILURE", "DELAY")}
    return tuple(n for n in ("SUCCESS", "FAILURE", "DELAY") if n in wanted) or ("NEVER",)


def _expanded_notify(notify: tuple[str, ...]) -> tuple[str, ...]:
    """NOTIFY for the addresses of an expanded alias: without SUCCESS, and NEVER when
    nothing is left (an empty NOTIFY would mean the default, FAILURE and DELAY)."""
    if "SUCCESS" not in notify:
        return notify
    return tuple(n for n in notify if n != "SUCCESS") or ("NEVER",)


def _expanded_results(rcpt: Recipient, answers: list[RecipientResult]) -> list[RecipientResult]:
    """The results of an alias of several addresses (RFC 3461 6.2.7.3, "expanded").

    Each address it expanded to is a recipient of its own: one that failed is named
    with its own reply (a temporary failure of any then defers the whole message, as
    for any recipient, and a permanent one is reported for that address, with the
    alias as Original-Recipient); the alias itself has its success when at least one
    address has the message.  One reply for all of them would either lose the
    temporarily failed copies (250, no retry) or refuse a message some have.
    """
    address = str(rcpt.address)
    orcpt = rcpt.orcpt or f"{'rfc822' if address.isascii() else 'utf-8'};{address}"
    failed = [
        a.for_recipient(Recipient(a.recipient.address, rcpt.notify, orcpt))
        for a in answers
        if not a.ok
    ]
    if len(failed) == len(answers):
        return failed
    return [RecipientResult(rcpt, next(a.reply for a in answers if a.ok), "expanded"), *failed]
