"""One SMTP reply from the per-recipient delivery results.

SMTP after DATA has one reply for the whole message, while LMTP and multi-destination
routing give one result per recipient.  The rule, so that no recipient is silently
dropped and none is told 250 for a message it did not get:

* every recipient durable -> ``250 2.0.0 OK: queued as <id>``;
* any temporary failure -> that 4xx for the whole message: the client retries, and the
  recipients already served may get a duplicate (a duplicate is better than a loss;
  the router and the hand-offs hold back what would be one: delivery.held_back);
* only permanent failures -> the first of them;
* durable for some, permanently refused for the others -> 250, and an RFC 3464 bounce
  to the sender for the refused ones (see ``Session`` and ``delivery.dsn``); when the
  bounce fails for now, the whole message is deferred (4xx), so that a retry can
  report it; when no retry could (the null sender, who is never bounced to, or a
  report refused for good), a 554 that names the refused recipients and says the
  others have it: the client then reports it itself, where a 4xx would have it send
  the message again and again, a copy each time for the recipients already served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailgate.delivery.base import RecipientResult, SpoolReader
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.replies import Reply, multiline, reply
from mailgate.server.context import Report

if TYPE_CHECKING:
    from mailgate.server.session import Session


async def combine_results(
    session: Session, envelope: Envelope, results: list[RecipientResult], spool: SpoolReader
) -> Reply:
    accepted = reply("data.accepted", id=session.message_id)
    if not results:
        return reply("delivery.local_error")
    failed = [r for r in results if not r.ok]
    if not failed:
        return accepted
    temporary = [r for r in failed if r.reply.code < 500]
    if temporary:
        # the cause, rather than a recipient held back because of it (delivery.held_back)
        return next((r.reply for r in temporary if r.reply.name != "delivery.held_back"),
                    temporary[0].reply)
    if len(failed) == len(results):
        return failed[0].reply
    # Only a report needs the spool as a file (its header is quoted in the report).
    report = await session.server.bounce(session, envelope, failed, spool.path)
    if report is Report.SENT:
        return accepted
    if report is Report.DEFER:
        return reply("delivery.report_deferred")
    return multiline(
        "delivery.partial_unreported",
        # each refusal's last line as sent on the wire: "554 5.6.0 mail refused ..."
        [f"<{r.recipient.address}>: {str(r.reply).splitlines()[-1]}" for r in failed],
    )
