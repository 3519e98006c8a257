"""The client's name, as DNS confirms it: for the Received: field and the log.

At connect the client's address is looked up (PTR), and a name counts only when it
resolves back to that address (forward-confirmed reverse DNS): anyone can put any
name in their own PTR records.  Without one the Received: field says ``unknown``, as
Postfix writes it and as downstream filters read it (RFC 5321 4.4 asks only for the
address literal; the name is extra information, so it must be right).

A client on the loopback interface is this machine: ``localhost``, without a lookup.
A lookup that fails or times out leaves the name unknown and never refuses anyone;
upas did not look names up at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Final

from mailgate.config.names import DOMAIN
from mailgate.policy.base import ACCEPT, Client, IPAddress, Step, Verdict
from mailgate.policy.dns import Resolver, Status
from mailgate.policy.networks import unmap

# A PTR record set with more names than this is checked only this far: each name
# costs a forward lookup, and a hostile zone could list hundreds.
MAX_NAMES: Final = 5


class ReverseNameStep(Step):
    """Sets ``client.reverse_name`` to the client's forward-confirmed DNS name.

    The lookups start at connect and are awaited at HELO, where the name is first
    used (the helo log line; the Received: field comes after it): the greeting does
    not wait for them, and they run while the DNSBL is asked and during a greeting
    pause.  A session that ends first has its lookup cancelled by the server."""

    name = "rdns"

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def connect(self, client: Client) -> Verdict:
        if unmap(client.ip).is_loopback:  # the usual case on a submission host: no task
            client.reverse_name = "localhost"
        else:
            client.name_lookup = asyncio.ensure_future(self.confirmed_name(client.ip))
        return ACCEPT

    async def helo(self, client: Client, name: str) -> Verdict:
        lookup, client.name_lookup = client.name_lookup, None
        if lookup is not None:
            client.reverse_name = await lookup
        return ACCEPT

    async def confirmed_name(self, ip: IPAddress) -> str | None:
        """The first PTR name of ``ip`` whose A or AAAA records include ``ip``, all
        within one lookup's timeout (the PTR and then the forward lookups could take
        two, which the EHLO reply waited for)."""
        ip = unmap(ip)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resolver.timeout
        answer = await self._resolver.lookup(ip.reverse_pointer, "PTR")
        if answer.status is not Status.FOUND:
            return None
        targets = (str(record.target).rstrip(".").lower() for record in answer.records)  # type: ignore[attr-defined]
        # only host names: this goes into a header field and the log
        names = [name for name in targets if DOMAIN.fullmatch(name)][:MAX_NAMES]
        rdtype = "A" if isinstance(ip, ipaddress.IPv4Address) else "AAAA"
        try:
            forward = await asyncio.wait_for(
                asyncio.gather(*(self._resolver.lookup(n, rdtype) for n in names)),
                max(deadline - loop.time(), 0.0),
            )
        except TimeoutError:
            return None
        for name, found in zip(names, forward, strict=True):
            if found.status is Status.FOUND and ip in _addresses(found.records):
                return name
        return None


def _addresses(records: tuple[object, ...]) -> set[IPAddress]:
    return {ipaddress.ip_address(record.address) for record in records}  # type: ignore[attr-defined]
