"""Streaming the spooled message onto a wire or a pipe, in large chunks.

The spool holds the message with CRLF line ends and no dot transparency.  Handing it
on needs chunk-wise transforms:

* :class:`DotStuffer` adds SMTP/LMTP dot transparency (RFC 5321 4.5.2) with one
  ``bytes.replace`` per chunk instead of a loop over lines;
* :class:`CanonicalLines` first makes every line end a CRLF, for a message that may
  hold a bare CR or LF (taken by BDAT, which is not read line by line);
* :class:`CRLFToLF` turns CRLF into LF for a Unix mailer on a pipe.

Both keep back the few trailing bytes of a chunk that could be the start of a pattern
split across two chunks, so the result does not depend on where the chunks are cut.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

CHUNK_SIZE = 256 * 1024  # big reads: one syscall and one replace() per 256 KiB


async def spool_chunks(path: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The file at ``path`` in chunks, each read off the event loop."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, chunk_size):
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


class DotStuffer:
    """Adds dot transparency to a CRLF message fed in arbitrary chunks."""

    def __init__(self) -> None:
        # The message starts at the beginning of a line: pretend a CRLF came before it
        # and drop those two bytes from the output again.
        self._pending = b"\r\n"
        self._skip = 2

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        keep = 2 if data.endswith(b"\r\n") else 1 if data.endswith(b"\r") else 0
        self._pending = data[len(data) - keep :]
        out = data[: len(data) - keep].replace(b"\r\n.", b"\r\n..")
        if self._skip:
            cut = min(self._skip, len(out))
            self._skip -= cut
            out = out[cut:]
        return out

    def finish(self) -> bytes:
        """The held-back tail, a CRLF if the message lacked a final one, and ``.CRLF``."""
        tail = self._pending[self._skip :]
        if self._pending != b"\r\n":
            tail += b"\r\n"
        return tail + b".\r\n"


class CanonicalLines:
    """Turns each bare LF and bare CR into CRLF, in a message fed in arbitrary chunks.

    RFC 5321 2.3.8: a client MUST send CR and LF only as CRLF.  Sent on as they came,
    a bare ``<LF>.<CRLF>`` in data taken by BDAT would end the DATA of a downstream
    that accepts a bare LF as a line end, and what followed it would be read as
    commands: a second message smuggled past every check of ours.
    """

    def __init__(self) -> None:
        self._cr = False  # the chunk so far ended with a CR: is it a CRLF's?

    def feed(self, chunk: bytes) -> bytes:
        data = b"\r" + chunk if self._cr else chunk
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        return b"\r\n" if self._cr else b""


class CRLFToLF:
    """Turns CRLF into LF in a message fed in arbitrary chunks; a lone CR is kept."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, chunk: bytes) -> bytes:
        data = b"\r" + chunk if self._cr else chunk
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        return data.replace(b"\r\n", b"\n")

    def finish(self) -> bytes:
        return b"\r" if self._cr else b""
