"""Where a message's header section ends (RFC 5322 2.1), for the parts that look at
the header fields of a spooled message: the loop count, the fields a submission
lacks, the UTF-8 check before a relay."""

from __future__ import annotations


def header_end(head: bytes) -> int:
    """Where the empty line after the header fields of ``head`` (a message's first
    octets) starts, or -1 when it is not within them.  DATA leaves CRLF line ends (a
    bare-LF-tolerant listener normalises them) but BDAT data keeps the ones it came
    with, so a bare-LF blank line counts too; it is only looked for when there is no
    CRLF one, since that search reads the whole head."""
    if head.startswith((b"\r\n", b"\n")):
        return 0
    end = head.find(b"\r\n\r\n")
    return end if end >= 0 else head.find(b"\n\n")
