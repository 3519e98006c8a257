"""Item 6: recipient limit, reject accounting, timeout and shutdown."""

from __future__ import annotations

from protocol_helpers import HOST, Session, codes, lines, scripted

from mailgate.protocol import events as ev
from mailgate.protocol.connection import Connection, Settings
from mailgate.protocol.replies import reply


def test_at_least_100_recipients_then_452() -> None:
    s = Session()
    s.transaction("<a@example.net>", *[f"<r{i}@example.org>" for i in range(100)])
    assert len(s.conn.envelope.recipients) == 100
    assert codes(s.send("RCPT TO:<r100@example.org>\r\n")) == ["452 4.5.3"]
    assert len(s.conn.envelope.recipients) == 100
    s.send("DATA\r\n")
    assert codes(s.send("x\r\n.\r\n")) == ["250 2.0.0"]


def test_recipient_limit_is_a_setting() -> None:
    s = Session(max_recipients=2)
    s.transaction("<a@example.net>", "<b@example.org>", "<c@example.org>")
    assert codes(s.send("RCPT TO:<d@example.org>\r\n")) == ["452 4.5.3"]


def test_error_budget_then_421() -> None:
    s = Session(max_errors=3)
    out = s.send("BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\nNOOP\r\n")
    assert codes(out) == ["500 5.5.1"] * 3 + ["421 4.7.0"]
    assert out[-1] == f"421 4.7.0 {HOST} Too many errors, closing connection"
    assert s.conn.closed and isinstance(s.events[-1], ev.Closed)
    # the 421 is a refusal of the command, for the log and the metrics as any other
    refused = s.of(ev.Rejected)[-1]
    assert (refused.command, refused.reply.name) == ("NOOP", "closing.too_many_errors")


def test_policy_refusals_count_too() -> None:
    s = Session(max_errors=2, decide=scripted(RcptTo=reply("rcpt.relay_denied")))
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\n")
    out = s.send("RCPT TO:<x@elsewhere.example>\r\nRCPT TO:<y@elsewhere.example>\r\nNOOP\r\n")
    assert codes(out) == ["550 5.7.1", "550 5.7.1", "421 4.7.0"]


def test_quit_is_still_answered_after_the_budget() -> None:
    s = Session(max_errors=1)
    assert codes(s.send("BAD\r\nQUIT\r\n")) == ["500 5.5.1", "221 2.0.0"]


def test_the_last_refusal_is_not_followed_by_an_early_421() -> None:
    # The limit-th refusal (here a line too long) is answered on its own; 421 comes
    # only when the client sends the next command.
    s = Session(max_errors=2)
    assert codes(s.send("BAD\r\n")) == ["500 5.5.1"]
    assert codes(s.send(b"NOOP " + b"x" * 600 + b"\r\n")) == ["500 5.5.2"]
    assert not s.conn.closed
    assert codes(s.send("NOOP\r\n")) == ["421 4.7.0"]
    assert s.conn.closed


def test_a_line_refused_for_its_form_past_the_budget_gets_421() -> None:
    s = Session(max_errors=1)
    s.send("BAD\r\n")
    assert codes(s.send(b"NOOP\n")) == ["421 4.7.0"]


def test_timeout_and_shutdown() -> None:
    conn = Connection(Settings(HOST))
    conn.greet()
    conn.data_to_send()
    conn.timeout()
    assert lines(conn.data_to_send()) == [
        f"421 4.4.2 {HOST} Timeout waiting for client input, closing connection"
    ]
    assert conn.closed and conn.next_event() == ev.Closed()
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is ev.NEED_DATA and conn.data_to_send() == b""

    conn = Connection(Settings(HOST))
    conn.receive_data(b"EHLO x.example\r\n")
    conn.shutdown()
    assert codes(lines(conn.data_to_send())) == ["421 4.3.2"]
    assert conn.next_event() == ev.Closed()
    assert conn.next_event() is ev.NEED_DATA  # the pipelined EHLO is never read


def test_shutdown_during_data_and_refuse_at_connect() -> None:
    s = Session()
    s.transaction()
    s.send("DATA\r\npartial body\r\n")
    s.conn.shutdown(reply("closing.internal", host=HOST))
    assert codes(lines(s.conn.data_to_send())) == ["421 4.3.0"]
    s.pump()
    assert isinstance(s.events[-1], ev.Closed) and not s.of(ev.MessageEnd)

    conn = Connection(Settings(HOST))
    conn.refuse(reply("closing.too_many_connections", host=HOST))
    assert codes(lines(conn.data_to_send())) == ["421 4.7.0"]
    assert conn.next_event() == ev.Closed()


def test_temporary_refusals_do_not_count() -> None:
    # Greylisting answers each new recipient 451; a legitimate MTA with many of them
    # must not run into "too many errors", nor into the 452 for the 101st recipient.
    greylisted = reply("greylist.deferred")
    s = Session(max_errors=2, decide=scripted(RcptTo=greylisted))
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\n")
    out = s.send("".join(f"RCPT TO:<r{i}@example.org>\r\n" for i in range(5)) + "NOOP\r\n")
    assert codes(out) == ["451 4.7.1"] * 5 + ["250 2.0.0"]
    s = Session(max_errors=2, max_recipients=1)
    s.transaction("<a@example.net>", "<r0@example.org>")
    out = s.send("".join(f"RCPT TO:<r{i}@example.org>\r\n" for i in range(1, 5)) + "NOOP\r\n")
    assert codes(out) == ["452 4.5.3"] * 4 + ["250 2.0.0"]
    assert s.conn.errors == 0


def test_a_message_its_destinations_failed_is_not_counted() -> None:
    def failed(conn: Connection, event: ev.Event) -> None:
        conn.reject(reply("delivery.downstream_perm"), counted=False)

    s = Session(max_errors=1, decide=scripted(MessageEnd=failed))
    s.transaction("<a@example.net>", "<b@example.org>")
    assert codes(s.send("DATA\r\nx\r\n.\r\n")) == ["354", "554 5.0.0"]
    assert s.conn.errors == 0
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]
    # a refusal of the message by policy (spam, say) does count
    s = Session(max_errors=1, decide=scripted(MessageEnd=reply("access.blocked")))
    s.transaction("<a@example.net>", "<b@example.org>")
    s.send("DATA\r\nx\r\n.\r\n")
    assert codes(s.send("NOOP\r\n")) == ["421 4.7.0"]


def test_what_follows_a_temporary_refusal_in_a_pipeline_does_not_count() -> None:
    # A greylisting 451 to RCPT: the pipelined DATA gets 503, no fault of the client's.
    # Counted, twenty greylisted messages on one connection met "421 Too many errors".
    s = Session(max_errors=3, decide=scripted(RcptTo=reply("greylist.deferred")))
    s.ehlo()
    for _ in range(10):
        out = s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                     "RSET\r\n")
        assert codes(out) == ["250 2.1.0", "451 4.7.1", "503 5.5.1", "250 2.0.0"]
    assert s.conn.errors == 0
    assert not [e for e in s.of(ev.Rejected) if e.counted]
    # ... but only as many as a transaction can bring: then they count again
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
    out = s.send("DATA\r\n" * 200)
    assert codes(out)[-1] == "421 4.7.0"


def test_a_deferred_mail_makes_its_pipelined_rcpt_and_data_uncounted() -> None:
    tempfail = reply("sender.dns_tempfail", domain="x.example")
    s = Session(max_errors=2, decide=scripted(MailFrom=tempfail))
    s.ehlo()
    for _ in range(5):
        out = s.send("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nRSET\r\n")
        assert [c[:3] for c in codes(out)] == ["451", "503", "503", "250"]
    assert s.conn.errors == 0


def test_what_follows_a_refused_mail_in_a_pipeline_does_not_count() -> None:
    # A denied sender with twelve pipelined recipients: one refusal, not thirteen (each
    # 503 was tarpitted, doubling: the first reply came after 303 s with a 1 s delay)
    denied = reply("access.denied", sender="a@x.example", host="example.org")
    s = Session(max_errors=3, decide=scripted(MailFrom=denied))
    s.ehlo()
    out = s.send("MAIL FROM:<a@x.example>\r\n" + "RCPT TO:<b@example.org>\r\n" * 12
                 + "DATA\r\nRSET\r\n")
    assert [c[:3] for c in codes(out)] == ["550"] + ["503"] * 13 + ["250"]
    assert s.conn.errors == 1
    assert [e.counted for e in s.of(ev.Rejected)] == [False] * 13


def test_bdat_chunks_after_a_deferred_one_do_not_count() -> None:
    # RFC 3030 2: the server must accept and discard the chunks already pipelined
    s = Session(max_errors=1, decide=scripted(DataStart=reply("greylist.deferred")))
    s.transaction()
    out = s.send("BDAT 3\r\nabcBDAT 3 LAST\r\ndefRSET\r\n")
    assert codes(out) == ["451 4.7.1", "503 5.5.1", "250 2.0.0"]
    assert s.conn.errors == 0 and not s.conn.closed


def test_junk_commands_past_their_limit_count_as_errors() -> None:
    # A client keeping a connection open with NOOPs (or RSET, VRFY, HELP) moves no
    # mail: past the limit each one spends the error budget, and then 421.
    s = Session(junk_command_limit=3, max_errors=2)
    s.ehlo()
    out = s.send("NOOP\r\nRSET\r\nVRFY alice\r\n")
    assert codes(out) == ["250 2.0.0", "250 2.0.0", "252 2.5.0"]
    assert s.conn.errors == 0
    assert codes(s.send("HELP\r\nNOOP\r\n")) == ["214 2.0.0", "250 2.0.0"]  # answered...
    assert s.conn.errors == 2  # ...and counted
    out = s.send("NOOP\r\n")
    assert codes(out) == ["421 4.7.0"] and s.conn.closed


def test_a_transaction_begun_starts_the_junk_count_again() -> None:
    s = Session(junk_command_limit=2, max_errors=1)
    s.ehlo()
    assert codes(s.send("NOOP\r\nNOOP\r\n")) == ["250 2.0.0"] * 2
    s.transaction("<a@example.net>", "<b@example.org>")  # MAIL accepted: real work
    s.send("DATA\r\n")
    assert codes(s.send("x\r\n.\r\n")) == ["250 2.0.0"]
    assert codes(s.send("NOOP\r\nRSET\r\n")) == ["250 2.0.0"] * 2
    assert s.conn.errors == 0
    assert codes(s.send("NOOP\r\nMAIL FROM:<a@example.net>\r\n")) == ["250 2.0.0", "421 4.7.0"]


def test_a_greylisted_queue_run_is_not_cut_off_by_its_resets() -> None:
    # An MTA delivering its queue to a greylisting server: MAIL, RCPT answered 450,
    # RSET, for each message; those RSETs are no stalling.
    s = Session(junk_command_limit=3, max_errors=2,
                decide=scripted(RcptTo=reply("greylist.deferred")))
    s.ehlo()
    for _ in range(10):
        out = s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n")
        assert codes(out) == ["250 2.1.0", "451 4.7.1", "250 2.0.0"]
    assert s.conn.errors == 0 and not s.conn.closed


def test_a_refused_vrfy_counts_once() -> None:
    # as a refusal, not also as junk (nor a refused RSET x)
    s = Session(junk_command_limit=1, max_errors=10)
    s.ehlo()
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]  # the limit reached
    assert codes(s.send("VRFY\r\n")) == ["501 5.5.2"]
    assert s.conn.errors == 1
    assert codes(s.send("RSET x\r\n")) == ["501 5.5.2"]
    assert s.conn.errors == 2
    assert codes(s.send("VRFY alice\r\n")) == ["252 2.5.0"]  # answered: junk past it
    assert s.conn.errors == 3
