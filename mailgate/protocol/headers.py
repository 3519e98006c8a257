"""Where a message's header section ends (RFC 5322 2.1), for the parts that look at
the header fields of a spooled message: the loop count, the fields a submission
lacks, the UTF-8 check before a relay."""

from __future__ import annotations

import re


def header_end(head: bytes) -> int:
    """Where the empty line after the header fields of ``head`` (a message's first
    octets) starts, or -1 when it is not within them.  DATA leaves CRLF line ends (a
    bare-LF-tolerant listener normalises them) but BDAT data keeps the ones it came
    with, so a blank line with a bare LF counts too.  Returns the position of the line
    end of the last header line: ``head[:end]`` are the fields without it."""
    if head.startswith((b"\r\n", b"\n")):
        return 0
    end = head.find(b"\r\n\r\n")
    stop = end if end >= 0 else len(head)
    # A blank line with a bare LF in it before that (or none): the first blank line
    # ends the header, whatever its line ends; a CRLF pair further on is the body's.
    if head.find(b"\n\n", 0, stop) < 0 and head.find(b"\n\r\n", 0, stop) < 0:
        return end
    found = _BLANK_LINE.search(head)
    assert found is not None  # (one of the two finds above saw it)
    return found.start()


# a line end, then an empty line, either of them CRLF or a bare LF
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
