"""A small async DNS resolver for policy checks, on dnspython's ``dns.asyncresolver``.

Every lookup ends in one of a few outcomes (:class:`Status`) and never raises: policy
steps only need to know whether a name has records, does not exist, or could not be
looked up right now.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailgate.config.policy import parse_nameserver
from mailgate.protocol.idn import ascii_domain

log = logging.getLogger("mailgate.policy.dns")

CACHE_SIZE = 10_000  # answers (name, type) kept at most


class Status(enum.Enum):
    FOUND = "found"  # records of the asked type
    NODATA = "nodata"  # the name exists, without records of that type
    NXDOMAIN = "nxdomain"  # the name does not exist
    TEMPFAIL = "tempfail"  # SERVFAIL, REFUSED, timeout: ask again later
    INVALID = "invalid"  # not a name DNS can hold (empty label, too long, bad IDNA)


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    records: tuple[object, ...] = ()  # dnspython rdata objects (A, AAAA, MX, TXT ...)


class Resolver:
    """Looks names up through ``servers`` ("ip" or "ip:port"), or the system resolver.

    ``timeout`` bounds one lookup as a whole, every nameserver tried included.
    Raises ValueError when ``servers`` is empty and the system has no resolver
    configuration, so a broken setup shows at start-up instead of as tempfails.
    """

    def __init__(self, servers: Sequence[str], timeout: float) -> None:
        if servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in map(parse_nameserver, servers)
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as exc:
                raise ValueError(
                    f"policy.dns_servers: empty and no system resolver configuration ({exc})"
                ) from None
        # The lifetime bounds the lookup; within it each try of a nameserver gets a
        # share, so that a dead first server, or one lost datagram, leaves time for
        # the next server or a resend (as resolv.conf's timeout and attempts do).
        # One try with the whole budget never reached a second server.
        resolver.lifetime = timeout
        resolver.timeout = min(resolver.timeout, timeout / 2)
        self.timeout = timeout  # one lookup's bound, for callers that chain lookups
        # Answers kept for their TTL: the same senders' domains and the same clients'
        # names come back connection after connection, and /etc/resolv.conf may name
        # a resolver far away.  Bounded; a reload starts with an empty one.
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        # a SERVFAIL is an answer for policy (tempfail), not a reason to hammer the server
        resolver.retry_servfail = False
        self._resolver = resolver

    async def lookup(self, name: str, rdtype: str) -> Answer:
        """Records of type ``rdtype`` ("A", "MX", "TXT" ...) for the absolute ``name``."""
        try:
            # An internationalized name in A-labels by our own Punycode, not by
            # dnspython's default codec: that is IDNA2003 unless the idna package
            # happens to be installed, and IDNA2003 turns straße.example into
            # strasse.example, another domain (see protocol/idn.py).
            qname = dns.name.from_text(ascii_domain(name), origin=dns.name.root)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return Answer(Status.INVALID)
        if qname == dns.name.root:  # "" or ".": no host or domain is called that
            return Answer(Status.INVALID)
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Answer(Status.NXDOMAIN)
        except dns.resolver.NoAnswer:
            return Answer(Status.NODATA)
        except (dns.resolver.NoNameservers, dns.exception.Timeout, OSError) as exc:
            log.debug("dns tempfail name=%s type=%s: %s", name, rdtype, exc)
            return Answer(Status.TEMPFAIL)
        except dns.exception.DNSException as exc:
            # YXDOMAIN, bad responses, names too long once the zone is added ...
            log.info("dns failure name=%s type=%s: %s", name, rdtype, exc)
            return Answer(Status.TEMPFAIL)
        if answer.rrset is None:
            return Answer(Status.NODATA)
        return Answer(Status.FOUND, tuple(answer.rrset))
