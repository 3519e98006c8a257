"""Message data readers: DATA (dot-transparency, RFC 5321 4.5.2) and BDAT (RFC 3030).

The DATA reader works on whole buffers, never line by line: ``bytes.find``,
``bytes.count`` and ``bytes.replace`` run in C, so a 50 MB message costs a handful of
passes over memory and no Python work per line.

SMTP smuggling: the only end of data is ``<CRLF>.<CRLF>``.  A bare LF or a bare CR
anywhere in the data makes the reader report ``bare``; the connection refuses the
message.  For clients allowed to send bare LF (``normalize``), a bare LF is stored as
CRLF (and a dot after it is unstuffed, as after any line end of that client), but it
never ends the data: the end marker is looked for before normalisation, and a line
that begins after a bare LF is never taken for the end line, however the bytes were
split between reads.
"""

from __future__ import annotations

from dataclasses import dataclass

END_MARKER = b"\r\n.\r\n"
# A long line with no LF is cut here so that the pending buffer stays small.
_MAX_PENDING_LINE = 65536


@dataclass(slots=True)
class DataResult:
    body: bytes  # unstuffed message bytes ready to be stored
    bare: bool  # a bare LF or bare CR was seen (refuse the message)
    done: bool  # the end marker was reached
    rest: bytes  # bytes after the end marker (the next commands), when done


class DotReader:
    """Incremental DATA reader: feed raw bytes, get unstuffed body bytes."""

    __slots__ = ("_after_crlf", "_at_line_start", "_normalize", "_pending")

    def __init__(self, normalize_bare_lf: bool = False) -> None:
        self._pending = b""
        self._at_line_start = True  # for dot-unstuffing: after any accepted line end
        self._after_crlf = True  # for the end line: only after a real CRLF
        self._normalize = normalize_bare_lf

    def feed(self, data: bytes) -> DataResult:
        buf = self._pending + data if self._pending else data
        # ".\r\n" ends the data only after a CRLF: after a bare LF (normalize mode)
        # that would be <LF>.<CR><LF>, the smuggling form, when the reads split there.
        if self._after_crlf and buf.startswith(b".\r\n"):
            self._pending = b""
            return DataResult(b"", False, True, buf[3:])
        # The end marker and every line to unstuff begin with <CRLF>"."; one search
        # for that tells whether the buffer holds either (most buffers of most
        # messages hold neither).  Each search over the data costs as much as the
        # rest of the work: CPython finds short patterns at about 1-2 GB/s here.
        dot = buf.find(b"\r\n.")
        end = buf.find(END_MARKER, dot) if dot >= 0 else -1
        if end >= 0:
            region = buf[: end + 2]
            body, bare = self._process(region, stuffed=dot < end)
            self._pending = b""
            return DataResult(body, bare, True, buf[end + 5 :])
        last_lf = buf.rfind(b"\n")
        if last_lf >= 0 and len(buf) - last_lf - 1 <= _MAX_PENDING_LINE:
            cut = last_lf + 1
            next_at_line_start = True
        elif len(buf) > _MAX_PENDING_LINE:
            # A very long line: process all but the last 4 bytes, which could begin an
            # end marker or a CRLF whose LF has not arrived yet.
            cut = len(buf) - 4
            next_at_line_start = False
        else:
            self._pending = buf
            return DataResult(b"", False, False, b"")
        # a "\r\n." that straddles the cut is unstuffed by the next feed (line start)
        body, bare = self._process(buf[:cut], stuffed=0 <= dot < cut - 2)
        self._pending = buf[cut:]
        self._at_line_start = next_at_line_start
        self._after_crlf = next_at_line_start and buf[cut - 2 : cut] == b"\r\n"
        return DataResult(body, bare, False, b"")

    def _process(self, region: bytes, stuffed: bool) -> tuple[bytes, bool]:
        """Check a region for bare CR/LF, normalise if allowed, undo dot-stuffing
        (``stuffed``: the region holds a <CRLF>"." somewhere)."""
        crlf = region.count(b"\r\n")
        # Every CR and LF in a CRLF pair: two passes (a count and a deletion) where
        # counting CR and LF apart took three; they run again only for a region that
        # has a stray one, to tell a bare CR from a bare LF.
        bare_cr = bare_lf = False
        if len(region) - len(region.translate(None, b"\r\n")) != 2 * crlf:
            bare_cr = region.count(b"\r") != crlf
            bare_lf = region.count(b"\n") != crlf
        if bare_lf and self._normalize:
            region = region.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            bare_lf = False
            stuffed = True  # a line after a bare LF may begin with a dot now
        if self._at_line_start and region.startswith(b"."):
            region = region[1:]
        if stuffed:
            region = region.replace(b"\r\n.", b"\r\n")
        return region, bare_cr or bare_lf


class ChunkReader:
    """One BDAT chunk being read: how many of its octets are still to come (the
    engine takes them from its buffer, see Connection._read_chunk)."""

    __slots__ = ("remaining",)

    def __init__(self, size: int) -> None:
        self.remaining = size
