"""Item 2: command order per RFC 5321 4.1.4, and what resets a transaction."""

from __future__ import annotations

from protocol_helpers import Session, codes

from mailgate.protocol import events as ev


def test_mail_before_helo_is_503() -> None:
    s = Session()
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["503 5.5.1"]
    assert not s.of(ev.MailFrom)


def test_rcpt_before_helo_and_before_mail_are_503() -> None:
    s = Session()
    assert codes(s.send("RCPT TO:<b@example.org>\r\n")) == ["503 5.5.1"]
    s.ehlo()
    assert codes(s.send("RCPT TO:<b@example.org>\r\n")) == ["503 5.5.1"]
    assert not s.of(ev.RcptTo)


def test_data_before_mail_and_before_an_accepted_rcpt_are_503() -> None:
    s = Session()
    assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]
    s.ehlo()
    assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]
    assert not s.of(ev.DataStart)


def test_data_after_only_refused_rcpts_is_503() -> None:
    from protocol_helpers import scripted

    from mailgate.protocol.replies import reply

    s = Session(decide=scripted(RcptTo=reply("rcpt.unknown", address="b@example.org")))
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert codes(s.send("RCPT TO:<b@example.org>\r\n")) == ["550 5.1.1"]
    assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]


def test_second_mail_inside_a_transaction_is_503() -> None:
    s = Session()
    s.transaction()
    assert codes(s.send("MAIL FROM:<other@example.net>\r\n")) == ["503 5.5.1"]
    assert str(s.conn.envelope.sender) == "a@example.net"
    assert len(s.of(ev.MailFrom)) == 1


def test_rset_resets_the_transaction() -> None:
    s = Session()
    s.transaction()
    assert codes(s.send("RSET\r\n")) == ["250 2.0.0"]
    assert s.conn.envelope is None
    assert codes(s.send("RCPT TO:<b@example.org>\r\n")) == ["503 5.5.1"]
    assert codes(s.send("MAIL FROM:<c@example.net>\r\n")) == ["250 2.1.0"]
    assert s.conn.helo == "client.example.net"  # RSET keeps the greeting


def test_helo_and_ehlo_reset_the_transaction() -> None:
    for verb in ("HELO", "EHLO"):
        s = Session()
        s.transaction()
        assert s.send(f"{verb} again.example.net\r\n")[0].startswith("250")
        assert s.conn.envelope is None
        assert codes(s.send("DATA\r\n")) == ["503 5.5.1"]
        assert codes(s.send("MAIL FROM:<c@example.net>\r\n")) == ["250 2.1.0"]


def test_a_message_end_starts_a_fresh_transaction() -> None:
    s = Session()
    s.transaction()
    s.send("DATA\r\n")
    assert codes(s.send("hi\r\n.\r\n")) == ["250 2.0.0"]
    assert s.conn.envelope is None
    assert codes(s.send("RCPT TO:<b@example.org>\r\n")) == ["503 5.5.1"]


def test_between_transactions_is_where_a_shutdown_cuts_nothing_off() -> None:
    s = Session()
    assert s.conn.between_transactions  # before the greeting's answer, nothing is open
    s.ehlo()
    assert s.conn.between_transactions
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert not s.conn.between_transactions
    s.send("RCPT TO:<b@example.org>\r\nBDAT 3\r\nabc")
    assert not s.conn.between_transactions  # between chunks: the message is open
    s.send("RSET\r\n")
    assert s.conn.between_transactions
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n")
    assert not s.conn.between_transactions
    s.send("\r\n.\r\n")
    assert s.conn.between_transactions  # answered: the transaction is over
