"""DNS blocklists (RFC 5782): look the client up at connect, refuse at MAIL.

The lookup starts at connect so the answer is ready (and logged) early; the refusal
waits for MAIL, like upas's IP rules, so the log line carries the sender the listed
client tried, and an ``allow sender`` rule or AUTH can still let it through.

An A record in 127.0.0.0/8 means "listed" (RFC 5782 section 2.1), except 127.255.255.x,
which lists such as Spamhaus use for errors ("query refused"), and 127.0.0.0 and
127.0.0.1, which no list uses for a listing (RFC 5782 5: 127.0.0.1 is what a list
must never contain; some answer it for a refused query).  Anything outside 127/8 is a
resolver lying about NXDOMAIN.  Those answers, like a lookup that fails, leave the
client unlisted and tagged ``dnsbl_error`` with a warning: a broken list must not stop
all mail, and must not quietly do nothing either.  The TXT record, when there is one,
gives the reason.  The connect line of the session log names a listing
(``dnsbl=zone``) or a failed zone, also for a client an allow rule or AUTH then lets
through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any, Final

from mailgate.policy.base import ACCEPT, Client, IPAddress, Step, Verdict
from mailgate.policy.dns import Resolver, Status
from mailgate.policy.networks import is_trusted, unmap
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.replies import reply

log = logging.getLogger("mailgate.policy.dnsbl")

_LISTED: Final = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_CODES: Final = ipaddress.IPv4Network("127.255.255.0/24")
_NO_LISTING: Final = frozenset(map(ipaddress.IPv4Address, ("127.0.0.0", "127.0.0.1")))
_TAGS: Final = ("dnsbl", "dnsbl_reason", "dnsbl_error")
TXT_WAIT: Final = 1.0  # seconds for a listed client's TXT reason


def query_name(ip: IPAddress, zone: str) -> str:
    """192.0.2.1 in zone z: "1.2.0.192.z"; IPv6 addresses by nibbles (RFC 5782 2.4)."""
    reverse = unmap(ip).reverse_pointer
    return reverse.rsplit(".", 2)[0] + "." + zone.strip(".")


class DnsblStep(Step):
    """Refuses (at MAIL) clients that one of ``zones`` lists, with the list's reason."""

    name = "dnsbl"

    def __init__(self, resolver: Resolver, zones: Sequence[str]) -> None:
        self._resolver = resolver
        self._zones = tuple(zones)

    async def connect(self, client: Client) -> Verdict:
        for key in _TAGS:
            client.tags.pop(key, None)
        if is_trusted(client) or client.tags.get("access_ip") == "allow":
            return ACCEPT
        results = await asyncio.gather(*(self._query(client.ip, zone) for zone in self._zones))
        failed = [zone for zone, status, _ in results if status is Status.TEMPFAIL]
        if failed:
            client.tags["dnsbl_error"] = ",".join(failed)
        # the first listing zone in configuration order decides, whatever answered first
        for zone, status, reason in results:
            if status is Status.FOUND:
                client.tags["dnsbl"] = zone
                client.tags["dnsbl_reason"] = reason
                break
        # (tags of the verdict reach the session's connect line)
        noted = tuple((key, client.tags[key]) for key in ("dnsbl", "dnsbl_error")
                      if key in client.tags)
        return Verdict(tags=noted) if noted else ACCEPT

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        zone = client.tags.get("dnsbl")
        if zone is None or is_trusted(client) or client.tags.get("access") == "allow":
            return ACCEPT
        if client.filter_state != "ACCEPT":  # an access rule already decided
            return ACCEPT
        client.filter_state = "DIALUP"
        reason = client.tags.get("dnsbl_reason", "listed")
        refusal = reply("access.dnsbl", ip=client.ip, zone=zone, reason=reason)
        return Verdict(refusal, tags=(("check", self.name), ("reason", "listed"), ("zone", zone)))

    async def _query(self, ip: IPAddress, zone: str) -> tuple[str, Status, str]:
        """(zone, FOUND when listed / NXDOMAIN when not / TEMPFAIL, the reason)."""
        name = query_name(ip, zone)
        answer = await self._resolver.lookup(name, "A")
        if answer.status in (Status.TEMPFAIL, Status.INVALID):
            # INVALID: a zone too long for the query name; never taken as "not listed"
            log.warning("dnsbl lookup failed zone=%s ip=%s (%s)", zone, ip, answer.status.value)
            return zone, Status.TEMPFAIL, ""
        records: tuple[Any, ...] = answer.records
        addresses = [ipaddress.ip_address(r.address) for r in records]
        if not any(_is_listing(a) for a in addresses):
            if not addresses:
                return zone, Status.NXDOMAIN, ""
            shown = ",".join(map(str, addresses))
            log.warning("dnsbl zone=%s answered %s for %s: an error code, not a listing "
                        "(is the zone refusing our queries?)", zone, shown, ip)
            return zone, Status.TEMPFAIL, ""
        try:
            # the reason is a courtesy: a zone slow to give it must not hold the
            # greeting for another lookup's timeout once the listing is known
            txt = await asyncio.wait_for(self._resolver.lookup(name, "TXT"), TXT_WAIT)
        except TimeoutError:
            return zone, Status.FOUND, "listed"
        reason = "; ".join(_text(r) for r in txt.records) if txt.status is Status.FOUND else ""
        return zone, Status.FOUND, reason or "listed"


def _is_listing(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address in _LISTED and address not in _ERROR_CODES and address not in _NO_LISTING


def _text(record: Any) -> str:
    return b"".join(record.strings).decode("utf-8", "replace")
