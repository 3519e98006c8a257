"""How mailboxes store line ends: CRLF to LF, a stray CR kept unless the message is
known to have none, BINARYMIME as received; whole and in chunks split anywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from delivery_helpers import TRACE, envelope, files, spooled

from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.maildir import MaildirDestination
from mailgate.delivery.spool import MEMORY_LIMIT, LineEnds
from mailgate.protocol.envelope import Address, Recipient

CLEAN = b"Subject: x\r\n\r\nline one\r\n\r\n.dot\r\nlast\r\n"  # every CR in a CRLF
STRAY = b"Subject: x\r\n\r\na\rb\r\n\r\r\nend\r\n"  # CRs of their own, as BDAT may carry


@pytest.mark.parametrize(
    ("ends", "data", "stored"),
    [
        (LineEnds.LF, CLEAN, CLEAN.replace(b"\r\n", b"\n")),
        (LineEnds.LF_DROPPING_CR, CLEAN, CLEAN.replace(b"\r\n", b"\n")),
        (LineEnds.LF, STRAY, b"Subject: x\n\na\rb\n\r\nend\n"),
        (LineEnds.AS_RECEIVED, STRAY, STRAY),
    ],
)
def test_whole_and_in_chunks_split_anywhere(ends: LineEnds, data: bytes, stored: bytes) -> None:
    assert ends.convert(data) == stored
    for cut in range(len(data) + 1):
        assert b"".join(ends.convert_chunks([data[:cut], data[cut:]])) == stored, cut


def test_binarymime_as_received_and_cr_dropped_only_without_a_stray_one() -> None:
    assert LineEnds.for_message("8BITMIME", no_bare_cr=True) is LineEnds.LF_DROPPING_CR
    assert LineEnds.for_message("7BIT", no_bare_cr=False) is LineEnds.LF
    assert LineEnds.for_message("BINARYMIME", no_bare_cr=False) is LineEnds.AS_RECEIVED


@pytest.mark.parametrize("size", ["held", "spooled"])
@pytest.mark.parametrize("no_bare_cr", [True, False])
def test_maildir_keeps_a_stray_cr_unless_told_there_is_none(
    tmp_path: Path, size: str, no_bare_cr: bool
) -> None:
    """A message from DATA (no stray CR) is stored with LF either way; one with a
    stray CR, which only an unchecked source can bring, keeps it."""
    filler = b"z" * (MEMORY_LIMIT + 10) + b"\r\n" if size == "spooled" else b""
    message = (CLEAN if no_bare_cr else STRAY) + filler
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, message, env)
    spool.no_bare_cr = no_bare_cr
    assert (spool.held() is None) == (size == "spooled")
    dest = MaildirDestination(str(tmp_path / "md"), "user", "mx.example.org", GroupCommitter())
    [result] = asyncio.run(
        dest.deliver(env, TRACE, spool, [Recipient(Address("alice", "example.org"))])
    )
    assert result.reply.code == 250
    [stored] = files(tmp_path / "md" / "alice" / "new")
    body = stored.read_bytes().split(b"\n\n", 1)[1]  # after the trace fields
    assert body == LineEnds.LF.convert(message).split(b"\n\n", 1)[1]
    assert (b"a\rb" in body) == (not no_bare_cr)
