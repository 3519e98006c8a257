"""Whether a BINARYMIME message holds binary data, for a next hop without BINARYMIME.

RFC 3030 3: binary data goes only to a server that offers BINARYMIME (by BDAT), and
must arrive with every bit of each octet.  A message declared BINARYMIME often holds
nothing but text lines (a client may declare it for any message it sends by BDAT):
such a message can go as 8BITMIME over DATA unchanged.  What cannot: a NUL, a CR or
LF outside a CRLF (DATA would end those lines), or a line over 998 octets (RFC 5321
4.5.3.1.6).
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_LINE = 998  # octets of a line before its CRLF
CHUNK_SIZE = 1024 * 1024


def holds_binary(chunks: Iterable[bytes]) -> bool:
    """Whether the message read in ``chunks`` needs BINARYMIME to travel unchanged."""
    tail = b""  # an unfinished line, carried to the next chunk
    for chunk in chunks:
        data = tail + chunk
        if b"\0" in data:
            return True
        end = data.rfind(b"\r\n") + 2  # the complete lines (none: 1, taken as 0)
        lines, tail = (data[:end], data[end:]) if end > 1 else (b"", data)
        crlf = lines.count(b"\r\n")
        if lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
            return True
        if crlf and max(map(len, lines.split(b"\r\n"))) > MAX_LINE:
            return True
        if len(tail) > MAX_LINE + 1:  # (+1: the CR of a CRLF split by the chunk)
            return True
    # the last line may lack its CRLF (DATA adds one): nothing else may be in it
    return len(tail) > MAX_LINE or b"\r" in tail or b"\n" in tail


def file_holds_binary(path: str) -> bool:
    """:func:`holds_binary` of the spool file at ``path`` (blocking: run in a thread)."""
    with open(path, "rb") as f:
        return holds_binary(iter(lambda: f.read(CHUNK_SIZE), b""))


def file_holds_8bit(path: str) -> bool:
    """Whether the spool file at ``path`` has an octet above 127 (blocking: run in a
    thread): 8BITMIME content, which a next hop without 8BITMIME must not get."""
    with open(path, "rb") as f:
        return not all(chunk.isascii() for chunk in iter(lambda: f.read(CHUNK_SIZE), b""))
