"""Item 5: DATA transparency, the one end marker, bare CR/LF, line length limits."""

from __future__ import annotations

import pytest
from protocol_helpers import HOST, Session, codes, lines

from mailgate.protocol import events as ev


def start_data(**settings: object) -> Session:
    s = Session(**settings)
    s.transaction()
    assert codes(s.send("DATA\r\n")) == ["354"]
    assert s.conn.in_data
    return s


def test_dot_unstuffing_and_end_marker() -> None:
    s = start_data()
    out = s.send("..leading dot\r\n...\r\nx.\r\n.\r\n")
    assert codes(out) == ["250 2.0.0"]
    assert s.body() == b".leading dot\r\n..\r\nx.\r\n"
    end = s.of(ev.MessageEnd)
    assert len(end) == 1 and end[0].size == len(s.body())


def test_empty_message() -> None:
    s = start_data()
    assert codes(s.send(".\r\n")) == ["250 2.0.0"]
    assert s.body() == b""


def test_end_marker_split_across_every_boundary() -> None:
    data = b"line one\r\n..two\r\n.\r\nNOOP\r\n"
    for cut in range(1, len(data)):
        s = start_data()
        out = s.feed(data[:cut]) + s.feed(data[cut:])
        assert codes(lines(out)) == ["250 2.0.0", "250 2.0.0"], cut
        assert s.body() == b"line one\r\n.two\r\n", cut


def test_body_is_delivered_in_large_slices() -> None:
    s = start_data()
    s.feed(b"0123456789abcdef\r\n" * 60_000 + b".\r\n")
    chunks = s.of(ev.BodyChunk)
    assert len(chunks) <= 2
    assert s.of(ev.MessageEnd)[0].size == 18 * 60_000


def test_8bit_and_nul_bytes_pass_through() -> None:
    s = start_data()
    s.feed(b"caf\xc3\xa9 \x00\xff\r\n.\r\n")
    assert s.body() == b"caf\xc3\xa9 \x00\xff\r\n"


# --- bare LF / bare CR --------------------------------------------------------


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n"])
def test_bare_line_ends_in_commands_are_refused(line: bytes) -> None:
    s = Session()
    assert codes(lines(s.feed(line + b"NOOP\r\n"))) == ["500 5.5.2", "250 2.0.0"]


def test_bare_lf_in_commands_normalised_when_allowed() -> None:
    s = Session(normalize_bare_lf=True)
    assert codes(lines(s.feed(b"EHLO c.example\nNOOP\n")))[-1] == "250 2.0.0"
    assert codes(s.send(b"NO\rOP\n")) == ["500 5.5.2"]  # a bare CR is never a line end


@pytest.mark.parametrize("bare", [b"a\nb\r\n", b"a\rb\r\n", b"ab\r\r\n"])
def test_bare_lf_or_cr_in_data_is_refused(bare: bytes) -> None:
    s = start_data()
    out = s.send(bare + b".\r\n")
    assert out == [f"521 5.5.2 {HOST} Bare LF or CR received in message data; "
                   "lines must end with CRLF"]
    assert not s.of(ev.MessageEnd)
    assert len(s.of(ev.MessageAborted)) == 1
    assert s.conn.closed and isinstance(s.events[-1], ev.Closed)


def test_bare_lf_in_data_normalised_when_allowed() -> None:
    s = start_data(normalize_bare_lf=True)
    assert codes(s.send(b"a\nb\r\n..c\n..d\r\n.\r\n")) == ["250 2.0.0"]
    assert s.body() == b"a\r\nb\r\n.c\r\n.d\r\n"


def test_bare_cr_in_data_is_refused_even_when_normalising() -> None:
    s = start_data(normalize_bare_lf=True)
    assert codes(s.send(b"a\rb\r\n.\r\n")) == ["521 5.5.2"]


# No variant of the end marker but <CRLF>.<CRLF> may end the data, in either mode,
# however the bytes are split; the "smuggled" commands after it must stay body text.
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n"]
SMUGGLED = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("fake", FAKE_ENDS)
def test_fake_end_markers_never_end_the_data(fake: bytes, normalize: bool) -> None:
    stream = b"Subject: x\r\n\r\nbody" + fake + SMUGGLED + b"forged\r\n.\r\nQUIT\r\n"
    where = stream.index(fake)
    splits = [
        [stream],
        [stream[: where + 1], stream[where + 1 :]],
        [stream[: where + len(fake) - 1], stream[where + len(fake) - 1 :]],
        [stream[:where], stream[where : where + len(fake)], stream[where + len(fake) :]],
        [stream[i : i + 1] for i in range(len(stream))],
    ]
    for parts in splits:
        s = start_data(normalize_bare_lf=normalize)
        for part in parts:
            s.feed(part)
        assert len(s.of(ev.MailFrom)) == 1, (fake, parts)
        assert len(s.of(ev.DataStart)) == 1
        ends = s.of(ev.MessageEnd)
        assert len(ends) <= 1
        if ends:
            # Only a normalising server keeps going, and then the whole rest is body.
            assert normalize and b"\r" not in fake.replace(b"\r\n", b"")
            assert b"MAIL FROM:<evil@example.net>" in s.body()
        else:
            assert s.of(ev.MessageAborted) and s.conn.closed


# --- line lengths -----------------------------------------------------------------


def test_command_line_limit_512() -> None:
    s = Session()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512
    assert codes(s.send(ok)) == ["250 2.0.0"]
    too_long = b"NOOP " + b"x" * (512 - 6) + b"\r\n"
    assert s.send(too_long) == ["500 5.5.2 Line too long"]
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]  # the session goes on


def test_very_long_line_in_pieces_gets_one_reply() -> None:
    s = Session()
    out = b""
    for _ in range(100):
        out += s.feed(b"y" * 1000)
    out += s.feed(b"\r\nNOOP\r\n")
    assert codes(lines(out)) == ["500 5.5.2", "250 2.0.0"]
    assert s.conn.buffered < 100  # the junk was not kept


@pytest.mark.parametrize(("verb", "limit"), [("MAIL", 2048), ("RCPT", 2048)])
def test_mail_rcpt_line_limit_2048(verb: str, limit: int) -> None:
    s = Session()
    s.ehlo()
    if verb == "RCPT":
        s.send("MAIL FROM:<a@example.net>\r\n")
    head = f"{verb} {'FROM' if verb == 'MAIL' else 'TO'}:<b@example.org>".encode()
    line = head + b" " * (limit - 2 - len(head)) + b"\r\n"
    assert codes(s.send(line))[0][0] == "2"
    s.send("RSET\r\n")
    if verb == "RCPT":
        s.send("MAIL FROM:<a@example.net>\r\n")
    assert s.send(head + b" " * (limit - 1 - len(head)) + b"\r\n") == ["500 5.5.2 Line too long"]


def test_auth_line_limit_12288() -> None:
    s = Session(auth_mechanisms=("PLAIN",), allow_plaintext_auth=True)
    s.ehlo()
    head = b"AUTH PLAIN "
    # Long but within the limit: a (bad) base64 answer, not "line too long".
    assert codes(s.send(head + b"A" * (12288 - 2 - len(head) - 1) + b"\r\n")) == ["501 5.5.2"]
    assert s.send(head + b"A" * (12288 - 1 - len(head)) + b"\r\n") == [
        "500 5.5.6 Authentication exchange line is too long"  # RFC 4954 4
    ]
