"""Mail loops: a message that has passed through too many hosts is refused.

RFC 5321 section 6.3: counting the ``Received:`` header fields detects loops, and a
server using it SHOULD set the threshold at 100 or more.  The count includes the
field this server adds (it is in the spool, first), so a message that arrived with
``limit`` fields is refused: passing it on would be hop ``limit + 1``.  The refusal
is permanent (``554 5.4.6``, routing loop detected, RFC 3463): sending it again
cannot help, and the sender's bounce tells a human where the loop is.
"""

from __future__ import annotations

import re
from typing import Final

from mailgate.policy.base import ACCEPT, Client, Spooled, Step, Verdict
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.headers import header_end
from mailgate.protocol.replies import reply

# A header field name at the start of a line, in the lower-cased header section with
# a newline put in front; folded continuation lines start with white space, so they
# are never counted.  (A literal first: re's fast search, where "^" with MULTILINE
# and IGNORECASE tried every position, 3 us for a small message's header.)
_RECEIVED: Final = re.compile(rb"\nreceived[ \t]*:")
_FIRST_READ: Final = 64 * 1024  # the header section of nearly every message
_MAX_READ: Final = 1024 * 1024  # how far a header section is followed at most


class HopCountStep(Step):
    """Refuses a message with more than ``limit`` Received: fields, this server's own
    included.  Applies to every client, trusted ones too: loops run between relays."""

    name = "hops"

    def __init__(self, limit: int) -> None:
        self._limit = limit

    async def message(self, client: Client, envelope: Envelope, body: Spooled) -> Verdict:
        head = body.read_head(_FIRST_READ)
        # Each field has the word: with no more of them than the limit in the whole
        # head there is nothing to parse (the common case, in about a microsecond).
        if len(head) < _FIRST_READ and head.lower().count(b"received") <= self._limit:
            return ACCEPT
        count = received_fields(body, head)
        if count <= self._limit:
            return ACCEPT
        tags = (("check", self.name), ("reason", "loop"), ("received", str(count)))
        return Verdict(reply("data.loop", count=count), tags=tags)


def received_fields(body: Spooled, head: bytes | None = None) -> int:
    """How many Received: fields the header section of the spooled message has
    (``head``: its first _FIRST_READ octets, when the caller read them already)."""
    if head is None:
        head = body.read_head(_FIRST_READ)
    end = header_end(head)
    if end < 0 and len(head) == _FIRST_READ:  # a long header section: follow it further
        head = body.read_head(_MAX_READ)
        end = header_end(head)
    section = head[:end] if end >= 0 else head
    return len(_RECEIVED.findall(b"\n" + section.lower()))

