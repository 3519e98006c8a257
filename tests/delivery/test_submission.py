"""The Date: and Message-ID: fields a submission server adds when they are missing."""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from mailgate.delivery.spool import MEMORY_LIMIT, SpoolDir
from mailgate.delivery.submission import HEAD_LIMIT, missing_fields

RECEIVED = b"Received: from c.example.org ([192.0.2.1]) by mx.example.org\r\n\tid x; now\r\n"


def added(message: bytes) -> bytes:
    """As the session asks: of the spool's first HEAD_LIMIT octets."""
    head = (RECEIVED + message)[:HEAD_LIMIT]
    return missing_fields(head, "6b07836b4e62466e.1", "mx.example.org")


def test_both_missing() -> None:
    fields = added(b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n").decode()
    date, message_id, end = fields.split("\r\n")
    assert end == ""
    assert date.startswith("Date: ") and parsedate_to_datetime(date[6:]).tzinfo is not None
    assert re.fullmatch(r"Message-ID: <6b07836b4e62466e\.1\.[0-9a-f]{12}@mx\.example\.org>",
                        message_id)
    assert added(b"Subject: x\r\n\r\n") != added(b"Subject: x\r\n\r\n")  # never the same id


@pytest.mark.parametrize(
    ("message", "wanted"),
    [
        (b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nx\r\n", []),
        (b"DATE : Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id:<a@b>\r\n\r\n", []),
        (b"Subject: x\r\nMessage-Id:\r\n <folded@b>\r\n\r\n", ["Date"]),
        (b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n", ["Message-ID"]),
        # in the body, not the header section: still missing
        (b"Subject: x\r\n\r\nDate: today\r\nMessage-ID: <a@b>\r\n", ["Date", "Message-ID"]),
        # a field whose name only begins so, or the word inside another field
        (b"Dates: x\r\nX-Message-ID: <a@b>\r\nSubject: Date: no\r\n\r\n", ["Date", "Message-ID"]),
        (b"Subject: x\n\nBDAT data with bare LF line ends\n", ["Date", "Message-ID"]),
    ],
)
def test_which_are_missing(message: bytes, wanted: list[str]) -> None:
    names = [line.split(b":")[0].decode() for line in added(message).splitlines()]
    assert names == wanted


def test_a_header_section_that_does_not_end_in_the_head_is_left_alone() -> None:
    assert added(b"Subject: x\r\n" + b"X-Long: " + b"y" * 70_000 + b"\r\n\r\n") == b""
    assert added(b"Subject: no body and no blank line\r\n") == b""


def test_a_whole_message_without_a_body_is_all_header() -> None:
    # RFC 5322 3.5: the body is optional, and so is the empty line before it
    whole = b"Subject: x\r\nFrom: a@b.example\r\n"
    fields = missing_fields(whole, "sid.1", "mx.example.org", whole=True)
    assert [line.split(b":")[0] for line in fields.splitlines()] == [b"Date", b"Message-ID"]
    has_both = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n"
    assert missing_fields(has_both, "sid.1", "mx.example.org", whole=True) == b""


@pytest.mark.parametrize("size", [100, MEMORY_LIMIT - 50, 3 * MEMORY_LIMIT])
def test_the_spool_takes_the_fields_after_the_trace(tmp_path: Path, size: int) -> None:
    spool = SpoolDir(str(tmp_path)).create("s")
    body = b"Subject: x\r\n\r\n" + b"z" * size
    spool.write(RECEIVED)
    spool.write(body)
    with pytest.raises(ValueError, match="still being written"):
        spool.insert(len(RECEIVED), b"Date: now\r\n")
    spool.close()
    spool.insert(len(RECEIVED), b"Date: now\r\n")
    whole = RECEIVED + b"Date: now\r\n" + body
    assert spool.size == len(whole)
    assert spool.read_head(len(whole) + 1) == whole
    with open(spool.path, "rb") as f:
        assert f.read() == whole
    spool.discard()
    assert list(tmp_path.iterdir()) == []  # no copy left behind
