"""The chunk-wise transforms give the same bytes as a line-by-line reference."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from mailgate.delivery.dotstuff import CanonicalLines, CRLFToLF, DotStuffer

# Messages made of the bytes that matter, so dots, CRs and LFs meet often.
messages = st.binary(max_size=200).map(lambda b: bytes(b"\r\n.x"[v % 4] for v in b)) | st.lists(
    st.sampled_from([b".", b"..", b"a", b".a", b""])
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
cuts = st.lists(st.integers(min_value=0, max_value=200), max_size=8)


def chunks(data: bytes, at: list[int]) -> list[bytes]:
    points = sorted({min(a, len(data)) for a in at})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def reference_stuffed(message: bytes) -> bytes:
    if not message:
        return b".\r\n"
    lines = message.split(b"\r\n")
    if not message.endswith(b"\r\n"):
        lines.append(b"")  # a CRLF is added to end the last line
    body = b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1]
    )
    return body + b".\r\n"


@given(messages, cuts)
def test_dot_stuffing_does_not_depend_on_chunks(message: bytes, at: list[int]) -> None:
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(c) for c in chunks(message, at)) + stuffer.finish()
    assert out == reference_stuffed(message)


@given(messages, cuts)
def test_crlf_to_lf_does_not_depend_on_chunks(message: bytes, at: list[int]) -> None:
    conv = CRLFToLF()
    out = b"".join(conv.feed(c) for c in chunks(message, at)) + conv.finish()
    assert out == message.replace(b"\r\n", b"\n")


def reference_canonical(message: bytes) -> bytes:
    """Line by line: a line ends at CRLF, at a bare LF or at a bare CR; each gets CRLF."""
    out, i = [], 0
    while i < len(message):
        octet = message[i : i + 1]
        if octet == b"\r":
            out.append(b"\r\n")
            i += 2 if message[i + 1 : i + 2] == b"\n" else 1
            continue
        out.append(b"\r\n" if octet == b"\n" else octet)
        i += 1
    return b"".join(out)


@given(messages, cuts)
def test_canonical_lines_do_not_depend_on_chunks(message: bytes, at: list[int]) -> None:
    lines = CanonicalLines()
    out = b"".join(lines.feed(c) for c in chunks(message, at)) + lines.finish()
    assert out == reference_canonical(message)


@given(messages, cuts)
def test_no_bare_line_end_survives_canonical_stuffing(message: bytes, at: list[int]) -> None:
    # What goes on the wire: only CRLF line ends, and the one end of data is the last.
    lines, stuffer = CanonicalLines(), DotStuffer()
    out = b"".join(stuffer.feed(lines.feed(c)) for c in chunks(message, at))
    out += stuffer.feed(lines.finish()) + stuffer.finish()
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert (b"\r\n" + out).find(b"\r\n.\r\n") == len(out) - 3


def test_smuggling_attempt_is_one_message() -> None:
    # BDAT data with <LF>.<CRLF> and commands after it (SMTP smuggling)
    data = b"Subject: x\r\n\r\nhello\n.\r\nMAIL FROM:<evil@x.test>\r\n"
    lines, stuffer = CanonicalLines(), DotStuffer()
    out = stuffer.feed(lines.feed(data)) + stuffer.feed(lines.finish()) + stuffer.finish()
    assert out == b"Subject: x\r\n\r\nhello\r\n..\r\nMAIL FROM:<evil@x.test>\r\n.\r\n"


def test_examples() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b".a\r\n") + stuffer.feed(b".\r\nb") + stuffer.finish() == (
        b"..a\r\n..\r\nb\r\n.\r\n"
    )
    empty = DotStuffer()
    assert empty.finish() == b".\r\n"
