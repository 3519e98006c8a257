"""Clients that talk before the greeting (upas smtpd, 2014).

RFC 5321 section 3.1: the client waits for the server's 220.  Spam engines often
do not: they send EHLO, or a whole transaction, at once.  With ``server.greet_pause``
the session holds the greeting back for a few seconds on public listeners and notes a
client whose bytes arrived in the meantime (``client.tags["pregreet"]``); this step
refuses its mail at MAIL FROM, where the log shows the sender it tried, rather than
hanging up at once.  Trusted clients, and an ``allow`` rule of the access list,
excuse it.
"""

from __future__ import annotations

from mailgate.policy.base import ACCEPT, Client, Step, Verdict
from mailgate.policy.networks import is_trusted
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.replies import reply

TAG = "pregreet"  # client.tags key: how many octets came before the greeting


class PregreetStep(Step):
    name = "pregreet"

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        early = client.tags.get(TAG)
        if early is None or is_trusted(client) or client.tags.get("access") == "allow":
            return ACCEPT
        tags = (("check", self.name), ("reason", "talked_first"), ("octets", early))
        return Verdict(reply("protocol.pregreet", ip=client.ip), tags=tags)
