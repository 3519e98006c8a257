"""End to end: real clients (smtplib, aiosmtplib, swaks) against ``mailgate serve``."""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import aiosmtplib
import pytest

from tests.integration.server import RunningServer, read_until, start_server

MESSAGE = b"From: a@client.example.org\r\nSubject: hello\r\n\r\nbody line\r\n.leading dot\r\n"


def test_smtplib_delivers_into_maildir(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        code, banner = smtp.ehlo("client.mailgate.org")
        assert code == 250
        assert b"ENHANCEDSTATUSCODES" in banner and b"CHUNKING" in banner
        refused = smtp.sendmail("a@client.mailgate.org", ["root@localhost"], MESSAGE)
        assert refused == {}
    [stored] = server.messages("root")
    # Maildir files use the local line end (LF), as mail readers expect.
    head, _, body = stored.partition(b"\n\n")
    assert stored.startswith(b"Return-Path: <a@client.mailgate.org>\n")
    # the client is this machine: localhost, without a DNS lookup
    assert b"Received: from client.mailgate.org (localhost [127.0.0.1])" in head
    assert b"by mx.mailgate.test" in head
    assert body == b"body line\n.leading dot\n"


def test_greeting_and_reply_codes(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        assert smtp.docmd("NOOP") == (250, b"2.0.0 OK")
        code, text = smtp.docmd("MAIL", "FROM:<a@b.org>")
        assert (code, text[:5]) == (503, b"5.5.1")
        smtp.ehlo("client.mailgate.org")
        assert smtp.docmd("TURN")[0] == 500
        assert smtp.docmd("STARTTLS") == (502, b"5.5.1 Command not implemented")
        assert smtp.docmd("VRFY", "root")[0] == 252
        assert smtp.docmd("HELP")[0] == 214


def test_aiosmtplib_with_bdat_free_pipelining(server: RunningServer) -> None:
    async def send() -> None:
        client = aiosmtplib.SMTP(hostname=server.host, port=server.port, timeout=10,
                                 start_tls=False, local_hostname="client.mailgate.org")
        await client.connect()
        await client.ehlo()
        errors, response = await client.sendmail(
            "b@client.mailgate.org", ["root@localhost", "postmaster@localhost"], MESSAGE
        )
        assert errors == {}
        assert response.startswith("2.0.0 OK: queued as ")
        await client.quit()

    asyncio.run(send())
    # postmaster is an alias of root: one message per recipient entry, none lost.
    assert len(server.messages("root")) >= 1


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks(server: RunningServer) -> None:
    out = subprocess.run(
        ["swaks", "--server", f"{server.host}:{server.port}", "--to", "root@localhost",
         "--from", "s@client.mailgate.org", "--helo", "client.mailgate.org", "--timeout", "10"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 OK: queued as" in out.stdout
    assert len(server.messages("root")) == 1


def _talk(server: RunningServer, payload: bytes, until: bytes) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        data = sock.recv(4096)
        assert data.startswith(b"220 mx.mailgate.test ESMTP")
        sock.sendall(payload)
        return read_until(sock, until)


def test_a_client_that_half_closes_after_quit_gets_every_reply(server: RunningServer) -> None:
    # RFC 5321 4.1.1.10: the client sends QUIT, then reads to EOF.  One that sends
    # its whole session and then shuts its side down (shutdown(SHUT_WR)) must still
    # learn that its message was taken, or it retries and the mail is duplicated.
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
                     b"RCPT TO:<root@localhost>\r\nDATA\r\n")
        read_until(sock, b"354 ")
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        rest = read_until(sock, b"no marker: read to EOF")
    assert re.match(rb"250 2\.0\.0 OK: queued as \S+\r\n221 2\.0\.0 ", rest), rest
    assert len(server.messages("root")) == 1


def test_a_half_closed_client_with_a_partial_command_gets_the_replies_before_it(
    server: RunningServer,
) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"EHLO client.mailgate.org\r\nNOOP\r\nMAIL FROM:<a@cli")
        sock.shutdown(socket.SHUT_WR)
        got = read_until(sock, b"no marker: read to EOF")
    assert got.endswith(b"250 2.0.0 OK\r\n"), got  # the NOOP's; the fragment is dropped
    assert "event=close" in server.log()


def test_pipelined_group_answered_in_order_in_one_write(server: RunningServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.recv(4096)
        sock.sendall(b"EHLO client.mailgate.org\r\n")
        ehlo = b""
        while not ehlo.endswith(b"250 ENHANCEDSTATUSCODES\r\n"):
            ehlo += sock.recv(4096)
        sock.sendall(b"MAIL FROM:<a@client.mailgate.org>\r\nRCPT TO:<root@localhost>\r\n"
                     b"RCPT TO:<nobody-here@localhost>\r\nDATA\r\n")
        first = sock.recv(65536)
        lines = first.decode().splitlines()
        assert [line[:3] for line in lines] == ["250", "250", "550", "354"], lines


def test_size_declared_and_exceeded(tmp_path) -> None:
    from tests.integration.server import start_server

    # the least the configuration allows: RFC 5321 4.5.3.1.7's 64K
    srv = start_server(tmp_path, "[server]\nmax_message_size = 65536\n"
                       f'spool_dir = "{tmp_path / "spool"}"\n')
    try:
        got = _talk(
            srv, b"EHLO c.mailgate.org\r\nMAIL FROM:<a@c.mailgate.org> SIZE=70000\r\n", b"552 "
        )
        assert b"552 5.3.4" in got
        big = b"x" * 998 + b"\r\n"
        got = _talk(srv, b"EHLO c.mailgate.org\r\nMAIL FROM:<a@c.mailgate.org>\r\n"
                    b"RCPT TO:<root@localhost>\r\nDATA\r\n" + big * 70 + b".\r\nQUIT\r\n", b"221 ")
        assert b"552 5.3.4" in got and b"221 2.0.0" in got
        assert srv.messages("root") == []
    finally:
        srv.stop()


def test_bdat_chunks_and_smtputf8_over_the_wire(server: RunningServer) -> None:
    body = "Subject: caf\u00e9\r\n\r\nr\u00e9sum\u00e9\r\n.not stuffed in BDAT\r\n".encode()
    first, second = body[:20], body[20:]
    got = _talk(
        server,
        b"EHLO client.mailgate.org\r\n"
        + "MAIL FROM:<j\u00f6rg@client.mailgate.org> SMTPUTF8 BODY=8BITMIME\r\n".encode()
        + b"RCPT TO:<root@localhost>\r\n"
        + f"BDAT {len(first)}\r\n".encode() + first
        + f"BDAT {len(second)} LAST\r\n".encode() + second
        + b"QUIT\r\n",
        b"221 ",
    )
    codes = [line[:3] for line in got.decode().splitlines()]
    assert codes[-5:] == ["250", "250", "250", "250", "221"], got
    [stored] = server.messages("root")
    assert stored.endswith("r\u00e9sum\u00e9\n.not stuffed in BDAT\n".encode())
    assert b"with UTF8SMTP" in stored


def test_a_message_abandoned_between_chunks_is_not_logged_as_refused(
    server: RunningServer,
) -> None:
    # RFC 3030 lets RSET discard the chunks sent so far: the client's choice, so no
    # "refused" message with a 250 code in the log, and the session goes on.
    got = _talk(
        server,
        b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
        b"RCPT TO:<root@localhost>\r\nBDAT 5\r\nabcdeRSET\r\n"
        b"MAIL FROM:<a@client.mailgate.org>\r\nRCPT TO:<root@localhost>\r\n"
        b"BDAT 17 LAST\r\nSubject: kept\r\n\r\nQUIT\r\n",
        b"221 ",
    )
    assert [line[:3] for line in got.decode().splitlines()][-7:] == ["250"] * 6 + ["221"]
    [stored] = server.messages("root")
    assert stored.endswith(b"Subject: kept\n\n")
    messages = [line for line in server.log().splitlines() if "event=message" in line]
    assert "outcome=abandoned" in messages[0] and "code=" not in messages[0]
    assert "code=250" in messages[1] and "outcome" not in messages[1]


def test_a_stray_cr_in_bdat_data_is_stored_as_it_came(server: RunningServer) -> None:
    """BDAT data is not checked for a CR outside CRLF (DATA refuses one): the Maildir
    copy keeps it, turning only the CRLF line ends into LF."""
    body = b"Subject: cr\r\n\r\nleft\rright\r\n"
    got = _talk(
        server,
        b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org> BODY=8BITMIME\r\n"
        b"RCPT TO:<root@localhost>\r\n" + f"BDAT {len(body)} LAST\r\n".encode() + body
        + b"QUIT\r\n",
        b"221 ",
    )
    assert [line[:3] for line in got.decode().splitlines()][-4:] == ["250"] * 3 + ["221"]
    [stored] = server.messages("root")
    assert stored.endswith(b"Subject: cr\n\nleft\rright\n")


def test_vrfy_when_verification_is_enabled(tmp_path) -> None:
    from tests.integration.server import start_server

    srv = start_server(tmp_path, f'[server]\nvrfy = true\nspool_dir = "{tmp_path}/spool"\n')
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            assert smtp.has_extn("vrfy")
            # RFC 5321 3.5.1: the 250 names the mailbox, domain and all
            assert smtp.verify("root") == (250, b"2.1.5 <root@mx.mailgate.test>")
            assert smtp.verify("<postmaster@localhost>")[0] == 250
            assert smtp.verify("nobody-by-this-name")[:1] == (550,)
            # RFC 6531 3.7.4.2: UTF-8 only with the SMTPUTF8 parameter
            smtp.send("VRFY j\u00f6rg\r\n".encode())  # (smtplib sends only ASCII)
            assert smtp.getreply()[0] == 550
            assert smtp.docmd("VRFY", "root SMTPUTF8") == (250, b"2.1.5 <root@mx.mailgate.test>")
    finally:
        srv.stop()


def test_no_relay_configured_refuses_a_remote_recipient_at_rcpt(server: RunningServer) -> None:
    # The defaults trust 127.0.0.1 but have no relay: a remote recipient is refused at
    # RCPT, and the local one of the same message is delivered once, not failed with
    # it after the data (a 451 would have it sent, and delivered, again).
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        refused = smtp.sendmail(
            "a@client.mailgate.org", ["friend@elsewhere.mailgate.org", "root@localhost"],
            b"Subject: two recipients\r\n\r\nhello\r\n",
        )
    assert refused == {
        "friend@elsewhere.mailgate.org": (
            550,
            b"5.4.4 No route to <friend@elsewhere.mailgate.org>: this server relays to no "
            b"other domain",
        )
    }
    assert len(server.messages("root")) == 1


def test_mail_of_our_own_users_gets_the_date_and_message_id_it_lacks(
    server: RunningServer, tmp_path: Path
) -> None:
    # A script on this machine (trusted) sends without them: added after our Received:
    # (RFC 6409 8.2, 8.3; large providers refuse mail without a Message-ID).
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"], b"Subject: bare\r\n\r\nhi\r\n")
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"],
                      b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <mine@c>\r\n\r\nx\r\n")
        # headers only, not even the empty line (RFC 5322 3.5: the body is optional)
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"], b"Subject: no body\r\n")
    bare, complete, headers_only = server.messages("root")
    assert headers_only.count(b"\nDate: ") == 1 and headers_only.count(b"\nMessage-ID: ") == 1
    head = bare.split(b"\n\n")[0].split(b"\n")
    assert head[0].startswith(b"Return-Path: ") and head[1].startswith(b"Received: ")
    names = [line.split(b":")[0] for line in head if not line.startswith(b"\t")]
    assert names == [b"Return-Path", b"Received", b"Date", b"Message-ID", b"Subject"]
    assert re.search(rb"\nMessage-ID: <[0-9a-f]+\.1\.[0-9a-f]{12}@mx\.mailgate\.test>\n", bare)
    assert complete.count(b"\nDate: ") == 1 and complete.count(b"Message-ID") == 1

    # Mail arriving as an MX (an untrusted client on the public listener) is passed on
    # as it came.
    other = start_server(tmp_path / "mx", "[policy]\ntrusted_networks = []\n"
                         "verify_sender_domain = false\n")
    try:
        with smtplib.SMTP(other.host, other.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.sendmail("a@client.mailgate.org", ["root@localhost"], b"Subject: as is\r\n\r\n")
        [stored] = other.messages("root")
        assert b"Message-ID" not in stored and b"\nDate:" not in stored
    finally:
        other.stop()


def test_a_client_still_sending_gets_the_refusal_that_ends_its_session(
    server: RunningServer,
) -> None:
    # A big message with LF line ends (curl without --crlf, a script): refused with
    # 521 at its first bare LF while the client still uploads.  Closed with its data
    # unread, the connection was reset and the client saw only that: the session now
    # half-closes and drops what still comes, so the 521 is read.
    body = b"Subject: lf\n\n" + b"a line ended by a bare LF\n" * 2_500_000  # ~65 MB
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
                     b"RCPT TO:<root@localhost>\r\nDATA\r\n")
        while not reader.readline().startswith(b"354 "):
            pass
        # all of it goes (clients such as smtplib give up on a failed send, without
        # reading the reply that explains it)
        sock.sendall(body + b".\r\n")
        assert reader.readline().startswith(b"521 5.5.2 ")
        assert reader.readline() == b""  # and then the end of the connection
    assert server.messages("root") == []
