"""Shared fixtures for the policy tests: a real DNS server on loopback with our zones.

The server is dnslib's DNSServer (UDP, 127.0.0.1, a free port) answering from
:class:`ZoneResolver`: records loaded from zone-file text, NXDOMAIN for names that do
not exist, SERVFAIL for names under a ``servfail`` suffix, and no answer at all for
names under a ``silent`` suffix (the client then times out).  The policy code talks to
it through its ordinary resolver (``mailgate.policy.dns.Resolver``), never a mock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.dns import DNSError
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from mailgate.policy.dns import Resolver

# The zones every policy test may rely on.  Names are under made-up TLDs so that a
# lookup escaping to the real internet could never succeed by accident.
BASE_ZONES = """
mx.sender.lab.          60 IN MX   10 mail.sender.lab.
mail.sender.lab.        60 IN A    192.0.2.25
a.sender.lab.           60 IN A    192.0.2.1
aaaa.sender.lab.        60 IN AAAA 2001:db8::1
nullmx.sender.lab.      60 IN MX   0 .
nullmx.sender.lab.      60 IN A    192.0.2.2
twomx.sender.lab.       60 IN MX   0 .
rootmx.sender.lab.      60 IN MX   10 .
twomx.sender.lab.       60 IN MX   10 mail.sender.lab.
txtonly.sender.lab.     60 IN TXT  "v=spf1 -all"
deep.sub.sender.lab.    60 IN A    192.0.2.3
10.2.0.192.bl.lab.      60 IN A    127.0.0.2
10.2.0.192.bl.lab.      60 IN TXT  "Listed: see https://bl.lab/q?192.0.2.10"
11.2.0.192.bl.lab.      60 IN A    127.0.0.4
2.0.0.127.bl.lab.       60 IN A    127.0.0.2
10.2.0.192.second.lab.  60 IN A    127.0.0.3
10.2.0.192.second.lab.  60 IN TXT  "second list"
12.2.0.192.second.lab.  60 IN A    127.0.0.3
12.2.0.192.second.lab.  60 IN TXT  "only on the second list"
*.errcode.lab.          60 IN A    127.255.255.254
*.refused.lab.          60 IN A    127.0.0.1
*.txtlate.lab.          60 IN A    127.0.0.2
*.zero.lab.             60 IN A    127.0.0.0
*.hijack.lab.           60 IN A    198.51.100.1
25.2.0.192.in-addr.arpa. 60 IN PTR mail.sender.lab.
26.2.0.192.in-addr.arpa. 60 IN PTR a.sender.lab.
27.2.0.192.in-addr.arpa. 60 IN PTR odd_name.sender.lab.
28.2.0.192.in-addr.arpa. 60 IN PTR a.sender.lab.
28.2.0.192.in-addr.arpa. 60 IN PTR Two.Sender.Lab.
32.2.0.192.in-addr.arpa. 60 IN PTR x.silent.sender.lab.
29.2.0.192.in-addr.arpa. 60 IN PTR x.servfail.sender.lab.
odd_name.sender.lab.    60 IN A    192.0.2.27
two.sender.lab.         60 IN A    192.0.2.28
xn--strae-oqa.sender.lab. 60 IN A  192.0.2.40
1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa. 60 IN PTR aaaa.sender.lab.
"""
# 2001:db8::bad, by nibbles, on bl.lab (RFC 5782 2.4)
V6_LISTED = "d.a.b.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.lab."
BASE_ZONES += f'{V6_LISTED} 60 IN A 127.0.0.2\n{V6_LISTED} 60 IN TXT "v6 spam source"\n'

SERVFAIL_SUFFIXES = ("servfail.sender.lab.", "broken.lab.")
SILENT_SUFFIXES = ("silent.sender.lab.", "slow.lab.")
TXT_SILENT_SUFFIXES = ("txtlate.lab.",)  # answers A, never TXT
LATE_NAMES = {"32.2.0.192.in-addr.arpa.": 0.8}  # answered after this many seconds


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from loaded records; records every question it was asked."""

    def __init__(self, zones: str) -> None:
        self.records: list[RR] = RR.fromZone(zones)
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
        if qname.endswith(SILENT_SUFFIXES) or (
            qtype == "TXT" and qname.endswith(TXT_SILENT_SUFFIXES)
        ):
            raise DNSError("silent zone: dropping the query")  # the handler sends nothing
        if qname in LATE_NAMES:
            time.sleep(LATE_NAMES[qname])  # (the server answers from threads of its own)
        reply = request.reply()
        if qname.endswith(SERVFAIL_SUFFIXES):
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        records = self._at(qname)
        below = any(str(r.rname).lower().endswith("." + qname) for r in self.records)
        if not records and not below:  # an empty non-terminal exists, without records
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for record in records:
            if QTYPE[record.rtype] == qtype:
                answer = RR(request.q.qname, record.rtype, rdata=record.rdata, ttl=record.ttl)
                reply.add_answer(answer)
        return reply

    def _at(self, qname: str) -> list[RR]:
        exact = [r for r in self.records if str(r.rname).lower() == qname]
        if exact:
            return exact
        # a wildcard answers for names any number of labels below it (RFC 4592)
        labels = qname.rstrip(".").split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:]) + "."
            found = [r for r in self.records if str(r.rname).lower() == wildcard]
            if found:
                return found
        return []


class LoopbackDNS:
    """The running server: its address, the questions it saw, and resolvers for it."""

    def __init__(self, zones: ZoneResolver, server: DNSServer) -> None:
        self.zones = zones
        self.server = server
        self.port: int = server.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"

    def resolver(self, timeout: float = 0.5) -> Resolver:
        return Resolver([self.address], timeout)

    def add(self, zone_text: str) -> None:
        self.zones.records.extend(RR.fromZone(zone_text))

    def asked(self, name: str) -> list[str]:
        """The types asked for ``name`` so far."""
        wanted = name.lower().rstrip(".") + "."
        return [qtype for qname, qtype in self.zones.queries if qname == wanted]


@pytest.fixture(scope="session")
def dns_server() -> Iterator[LoopbackDNS]:
    zones = ZoneResolver(BASE_ZONES)
    quiet = DNSLogger(logf=lambda _message: None)
    server = DNSServer(zones, address="127.0.0.1", port=0, logger=quiet)
    server.start_thread()
    try:
        yield LoopbackDNS(zones, server)
    finally:
        server.stop()
        server.server.server_close()
