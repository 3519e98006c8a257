"""header_end: where the header section of a message's first octets ends."""

from __future__ import annotations

import pytest

from mailgate.protocol.headers import header_end


@pytest.mark.parametrize(
    ("head", "end"),
    [
        (b"Subject: x\r\nFrom: a@b\r\n\r\nbody\r\n", 21),
        (b"Subject: x\n\nbody\n", 10),  # BDAT data with bare LF line ends
        (b"Subject: x\r\n\r\nbody\n\nmore\n", 10),  # CRLF first: the LF pair is body
        (b"\r\nbody only\r\n", 0),
        (b"\nbody only\n", 0),
        (b"Subject: x\r\nno end within the head", -1),
        # BDAT data with mixed line ends: the first blank line, whichever its ends
        (b"Received: r\r\nSubject: x\n\nbody\r\n\r\nmore", 23),
        (b"Received: r\r\nSubject: x\r\n\nbody\r\n\r\nmore", 23),
        (b"Received: r\r\nSubject: x\n\r\nbody\r\n\r\nmore", 23),
        (b"Subject: x\nbody, no blank line\r\n", -1),
    ],
)
def test_header_end(head: bytes, end: int) -> None:
    assert header_end(head) == end
