"""The discard destination: a black hole that accepts mail and keeps none of it.

For spam traps and retired addresses whose mail nobody should read, and for
benchmarks that measure the server alone.  Throwing the message away is the whole
point, so its 250 is honest: there is nothing left to make durable.

A NOTIFY=SUCCESS gets no report from here: the message was not delivered anywhere,
and a spam trap that answered its (mostly forged) senders would betray itself and
send them backscatter.
"""

from __future__ import annotations

from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import reply


class DiscardDestination:
    """Accepts every recipient routed to it and stores nothing."""

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        ok = reply("ok")
        return [RecipientResult(rcpt, ok, action="") for rcpt in recipients]
