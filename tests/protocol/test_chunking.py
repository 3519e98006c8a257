"""CHUNKING (RFC 3030): BDAT byte counts, LAST, refusals that still eat their chunk."""

from __future__ import annotations

from protocol_helpers import Session, codes, lines, scripted

from mailgate.protocol import events as ev
from mailgate.protocol.replies import reply


def ready(**settings: object) -> Session:
    s = Session(**settings)
    s.transaction()
    return s


def test_bdat_chunks_with_exact_counts() -> None:
    s = ready()
    assert s.send(b"BDAT 5\r\nhel\r\n") == ["250 2.0.0 5 octets received"]
    assert codes(s.send(b"BDAT 7 LAST\r\nlo\r\n.\r\n")) == ["250 2.0.0"]
    # Nothing is unstuffed or interpreted in a chunk.
    assert s.body() == b"hel\r\nlo\r\n.\r\n"
    assert len(s.of(ev.DataStart)) == 1 and s.of(ev.DataStart)[0].chunked
    assert s.of(ev.MessageEnd)[0].size == 12
    assert s.conn.envelope is None


def test_bdat_pipelined_in_one_write_and_byte_by_byte_agree() -> None:
    stream = b"BDAT 4\r\nabcdBDAT 3 LAST\r\nefgNOOP\r\n"
    a = ready()
    whole = a.send(stream)
    b = ready()
    out = b"".join(b.feed(stream[i : i + 1]) for i in range(len(stream)))
    assert lines(out) == whole
    assert codes(whole) == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert a.body() == b.body() == b"abcdefg"


def test_bdat_0_last() -> None:
    s = ready()
    s.send(b"BDAT 3\r\nabc")
    assert codes(s.send("BDAT 0 LAST\r\n")) == ["250 2.0.0"]
    assert s.of(ev.MessageEnd)[0].size == 3
    s2 = ready()
    assert codes(s2.send("BDAT 0 LAST\r\n")) == ["250 2.0.0"]
    assert s2.of(ev.MessageEnd)[0].size == 0


def test_last_is_case_insensitive() -> None:
    s = ready()
    assert codes(s.send(b"BDAT 1 last\r\nx")) == ["250 2.0.0"]
    assert s.of(ev.MessageEnd)


def test_data_after_bdat_is_503() -> None:
    s = ready()
    s.send(b"BDAT 2\r\nab")
    assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]
    assert len(s.of(ev.DataStart)) == 1


def test_rcpt_after_bdat_is_503() -> None:
    # The driver has held the envelope since the first BDAT; it cannot grow under it.
    s = ready()
    s.send(b"BDAT 2\r\nab")
    assert codes(s.send("RCPT TO:<late@example.org>\r\n")) == ["503 5.5.1"]
    assert len(s.of(ev.DataStart)[0].envelope.recipients) == 1


def test_bdat_without_transaction_still_consumes_its_chunk() -> None:
    s = Session()
    s.ehlo()
    out = s.send(b"BDAT 6\r\nNOOP\r\nNOOP\r\n")
    assert codes(out) == ["503 5.5.1", "250 2.0.0"]  # the first NOOP was chunk data
    # no transaction was aborted: there was none
    assert out[0] == "503 5.5.1 Need MAIL before BDAT, chunk discarded"
    assert not s.of(ev.BodyChunk)


def test_bdat_without_recipients_consumes_its_chunk() -> None:
    s = Session()
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert codes(s.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")) == ["503 5.5.1", "250 2.0.0"]
    assert not s.conn.closed


def test_refused_bdat_by_the_driver_consumes_its_chunk() -> None:
    s = Session(decide=scripted(DataStart=reply("access.blocked")))
    s.transaction()
    assert codes(s.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")) == ["554 5.7.1", "250 2.0.0"]
    assert not s.of(ev.BodyChunk) and not s.conn.closed
    # The transaction is gone: a further BDAT is refused and eaten too.
    assert codes(s.send(b"BDAT 4 LAST\r\nRSETNOOP\r\n")) == ["503 5.5.1", "250 2.0.0"]


def test_bdat_bad_arguments() -> None:
    s = ready()
    assert codes(s.send("BDAT\r\n")) == ["501 5.5.2"]
    assert codes(s.send("BDAT x\r\n")) == ["501 5.5.2"]
    assert codes(s.send("BDAT -1\r\n")) == ["501 5.5.2"]
    # A size we can read is consumed even if the rest of the line is wrong.
    assert codes(s.send(b"BDAT 4 NOTLAST\r\nNOOPNOOP\r\n")) == ["501 5.5.2", "250 2.0.0"]


def test_size_exceeded_over_bdat() -> None:
    s = ready(max_message_size=10)
    s.send(b"BDAT 8\r\n12345678")
    assert codes(s.send(b"BDAT 8 LAST\r\n12345678")) == ["552 5.3.4"]
    assert len(s.of(ev.MessageAborted)) == 1 and not s.of(ev.MessageEnd)
    assert s.conn.envelope is None


def test_rset_between_chunks_aborts_the_open_message() -> None:
    # RFC 3030 2: RSET after the first BDAT discards the segments; the driver must hear
    # of it to drop its spool.
    s = ready()
    s.send(b"BDAT 3\r\nabc")
    assert codes(s.send("RSET\r\n")) == ["250 2.0.0"]
    assert [e.abandoned for e in s.of(ev.MessageAborted)] == [True]
    assert codes(s.send(b"BDAT 1 LAST\r\nx")) == ["503 5.5.1"]
    assert len(s.of(ev.MessageAborted)) == 1  # nothing was open any more


def test_ehlo_and_refused_bdat_between_chunks_abort_the_open_message() -> None:
    s = ready()
    s.send(b"BDAT 3\r\nabc")
    s.ehlo()
    assert [e.abandoned for e in s.of(ev.MessageAborted)] == [True]
    s = ready()
    s.send(b"BDAT 3\r\nabc")
    assert codes(s.send(b"BDAT 2 MORE\r\nxy")) == ["501 5.5.2"]
    assert [e.abandoned for e in s.of(ev.MessageAborted)] == [False]
    assert not s.of(ev.MessageEnd)


def test_a_finished_message_is_not_aborted_by_rset() -> None:
    s = ready()
    s.send(b"BDAT 1 LAST\r\nx")
    s.send("RSET\r\n")
    s.transaction()
    s.send("DATA\r\n")
    s.send("y\r\n.\r\n")
    s.send("RSET\r\n")
    assert not s.of(ev.MessageAborted)
    assert len(s.of(ev.MessageEnd)) == 2
