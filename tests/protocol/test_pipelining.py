"""PIPELINING (RFC 2920): one group in, its replies out in order in one write; nothing
after a decision or a TLS change is acted on early."""

from __future__ import annotations

from protocol_helpers import Session, codes, lines, scripted

from mailgate.protocol import events as ev
from mailgate.protocol.connection import MAX_QUEUED_REPLIES, Connection, Settings
from mailgate.protocol.replies import reply

GROUP = (
    "MAIL FROM:<a@example.net>\r\n"
    "RCPT TO:<b@example.org>\r\n"
    "RCPT TO:<c@example.org>\r\n"
    "DATA\r\n"
)


def test_a_group_is_answered_in_order_in_one_write() -> None:
    s = Session()
    s.ehlo()
    out = s.send(GROUP)
    assert codes(out) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    assert len(s.writes) == 2  # the EHLO reply, then the whole group at once


def test_a_refused_rcpt_inside_the_group() -> None:
    def decide(conn: Connection, event: ev.Event) -> None:
        if isinstance(event, ev.RcptTo) and event.recipient.address.local == "b":
            conn.reject(reply("rcpt.unknown", address="b@example.org"))
        else:
            conn.accept()

    s = Session(decide=decide)
    s.ehlo()
    assert codes(s.send(GROUP)) == ["250 2.1.0", "550 5.1.1", "250 2.1.5", "354"]


def test_nothing_after_a_pending_decision_is_read() -> None:
    conn = Connection(Settings("mx.example.org"))
    conn.receive_data(b"EHLO c.example\r\n" + GROUP.encode())
    assert isinstance(conn.next_event(), ev.Helo)
    assert conn.next_event() is ev.PAUSED
    assert conn.next_event() is ev.PAUSED
    conn.accept()
    mail = conn.next_event()
    assert isinstance(mail, ev.MailFrom)
    assert conn.next_event() is ev.PAUSED and conn.envelope is None
    conn.reject(reply("sender.domain_missing", domain="example.net"))
    # The RCPTs and DATA now meet no transaction.
    for _ in range(3):
        assert isinstance(conn.next_event(), ev.Rejected)
    assert conn.next_event() is ev.NEED_DATA
    assert codes(conn.data_to_send().decode().split("\r\n")) == [
        "250", "550 5.1.8", "503 5.5.1", "503 5.5.1", "503 5.5.1"
    ]


def test_rejected_rcpt_then_pipelined_data_and_body_become_commands() -> None:
    # The standard outcome: DATA gets 503, so the body lines are read as commands.
    s = Session(decide=scripted(RcptTo=reply("rcpt.relay_denied")))
    s.ehlo()
    out = s.send(
        "MAIL FROM:<a@example.net>\r\nRCPT TO:<b@elsewhere.example>\r\nDATA\r\n"
        "Subject: hi\r\n\r\nhello\r\n.\r\n"
    )
    assert codes(out) == ["250 2.1.0", "550 5.7.1", "503 5.5.1"] + ["500 5.5.1"] * 4
    assert not s.of(ev.DataStart) and not s.of(ev.BodyChunk)
    assert not s.conn.closed


def test_starttls_discards_what_was_pipelined_after_it() -> None:
    def accept_only(conn: Connection, event: ev.Event) -> None:
        conn.accept()  # the handshake is done by hand below

    s = Session(starttls=True, decide=accept_only)
    s.ehlo()
    out = s.send("STARTTLS\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
    assert codes(out) == ["220 2.0.0"]
    assert s.conn.buffered == 0  # the plaintext behind STARTTLS is gone
    # What the driver feeds from now on came through the handshake: it waits for
    # tls_started() and is then read in the fresh session.
    assert s.send("EHLO again.example\r\n") == []
    s.conn.tls_started()
    assert not s.of(ev.MailFrom)
    s.pump()
    assert s.conn.helo == "again.example"
    assert s.conn.data_to_send().startswith(b"250-mx.example.org you are again.example\r\n")
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["250 2.1.0"]
    assert len(s.of(ev.MailFrom)) == 1


def test_tls_session_starts_fresh() -> None:
    s = Session(starttls=True)
    s.transaction()
    s.send("STARTTLS\r\n")
    assert s.conn.helo is None and s.conn.envelope is None  # RFC 3207 4.2
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["503 5.5.1"]


def test_starttls_refused_by_the_driver_keeps_the_session() -> None:
    s = Session(starttls=True, decide=scripted(StartTLS=reply("starttls.unavailable")))
    s.ehlo()
    out = s.send("STARTTLS\r\nMAIL FROM:<a@example.net>\r\n")
    assert codes(out) == ["454 4.7.0", "250 2.1.0"]
    assert not s.conn.tls_active


def test_starttls_with_argument_and_twice() -> None:
    s = Session(starttls=True)
    s.ehlo()
    assert codes(s.send("STARTTLS now\r\n")) == ["501 5.5.2"]
    s.send("STARTTLS\r\n")
    s.ehlo()
    assert codes(s.send("STARTTLS\r\n")) == ["503 5.5.1"]


def test_require_tls_refuses_mail_before_starttls() -> None:
    s = Session(starttls=True, require_tls=True)
    s.ehlo()
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["530 5.7.0"]
    s.send("STARTTLS\r\n")
    s.ehlo()
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["250 2.1.0"]


def test_pipelined_message_then_next_transaction() -> None:
    s = Session()
    s.ehlo()
    s.send(GROUP)
    out = s.send("body\r\n.\r\nMAIL FROM:<z@example.net>\r\nRCPT TO:<y@example.org>\r\n")
    assert codes(out) == ["250 2.0.0", "250 2.1.0", "250 2.1.5"]
    assert len(s.of(ev.MessageEnd)) == 1


def test_a_long_run_answered_by_the_engine_alone_is_sent_as_it_goes() -> None:
    # HELP is 6 octets and its reply over 100: a megabyte of it became twenty of
    # replies before anything was sent, whether or not the client read them.
    # (past junk_command_limit such a run is soon closed: here it must not be)
    conn = Connection(Settings("mx.example.org", junk_command_limit=1000))
    conn.greet()
    conn.receive_data(b"EHLO client.example.net\r\n")
    assert isinstance(conn.next_event(), ev.Helo)
    conn.accept()
    assert conn.next_event() is ev.NEED_DATA
    conn.data_to_send()
    conn.receive_data(b"HELP\r\n" * 1000)
    replies: list[str] = []
    while (event := conn.next_event()) is ev.SEND_FIRST:
        batch = codes(lines(conn.data_to_send()))
        assert len(batch) == MAX_QUEUED_REPLIES  # never more queued at once
        replies += batch
    assert event is ev.NEED_DATA
    replies += codes(lines(conn.data_to_send()))
    assert replies == ["214 2.0.0"] * 1000


def test_a_pipelined_run_of_bdat_chunks_is_read_whole_and_answered_in_order() -> None:
    # Each chunk copied the whole buffered input (quadratic: a megabyte of "BDAT 0"
    # took seconds); what a long run must still give is every chunk's reply and data.
    s = Session()
    s.transaction()
    out = s.send(b"BDAT 3\r\nabc" * 2000 + b"BDAT 0 LAST\r\n")
    assert codes(out) == ["250 2.0.0"] * 2001
    assert s.body() == b"abc" * 2000
    assert len(s.writes) > 2001 // MAX_QUEUED_REPLIES  # sent as it went
