"""The DATA reader against a line-by-line model of RFC 5321 4.5.2: the same body, the
same end and bytes after it, the same verdict on bare CR/LF, however the stream is
split into reads.  The reader works on whole buffers (no Python work per line); the
model reads line by line, which is easy to check by eye."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.protocol.body import DotReader

# Pieces that make every case: line ends, bare CR/LF, dots at line starts, end markers
# (real and faked after a bare LF), and plain octets.
PIECES = st.sampled_from([
    b"\r\n", b"\r", b"\n", b".", b"..", b"x", b"abc", b"\r\n.\r\n", b".\r\n", b"\r\n.",
    b"\n.\r\n", b"\n.", b"\x00", b"\xff",
])


def model(stream: bytes, normalize: bool) -> tuple[bytes, bool, bool, bytes]:
    """(body, bare, done, rest) for a whole stream, one line at a time."""
    body: list[bytes] = []
    bare = False
    after_crlf = True  # the end line counts only after a real CRLF
    pos = 0
    while (nl := stream.find(b"\n", pos)) >= 0:
        line = stream[pos : nl + 1]
        if line == b".\r\n" and after_crlf:
            return b"".join(body), bare, True, stream[nl + 1 :]
        content = line[:-1]
        crlf = content.endswith(b"\r")
        if crlf:
            content = content[:-1]
        elif not normalize:
            bare = True  # a bare LF
        if b"\r" in content:
            bare = True  # a bare CR
        if content.startswith(b"."):
            content = content[1:]  # dot-stuffing undone at every line start
        body.append(content + b"\r\n")
        after_crlf = crlf
        pos = nl + 1
    return b"".join(body), bare, False, b""


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(PIECES, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    normalize=st.booleans(),
)
def test_the_reader_agrees_with_the_line_model(
    pieces: list[bytes], cuts: list[int], normalize: bool
) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"  # an end is always there
    want_body, want_bare, want_done, want_rest = model(stream, normalize)
    assert want_done
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    reader = DotReader(normalize)
    body, bare = b"", False
    for i, data in enumerate(reads):
        result = reader.feed(data)
        body += result.body
        bare = bare or result.bare
        if result.done:
            rest = result.rest + b"".join(reads[i + 1 :])
            break
    else:
        raise AssertionError("the reader never saw the end of the data")
    assert bare == want_bare
    assert rest == want_rest
    if not bare:  # a message with a bare CR or LF is refused whole: its body is moot
        assert body == want_body
