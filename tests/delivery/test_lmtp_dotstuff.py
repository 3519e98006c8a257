"""The chunk-wise transforms give the same bytes as a line-by-line reference."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from mailgate.delivery.dotstuff import CRLFToLF, DotStuffer

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


def test_examples() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b".a\r\n") + stuffer.feed(b".\r\nb") + stuffer.finish() == (
        b"..a\r\n..\r\nb\r\n.\r\n"
    )
    empty = DotStuffer()
    assert empty.finish() == b".\r\n"
