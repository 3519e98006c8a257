"""SmarthostDestination against a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailgate.config.delivery import SmtpConfig
from mailgate.delivery.base import RecipientResult, TraceInfo
from mailgate.delivery.smarthost import SmarthostDestination
from mailgate.delivery.smtp_client import (
    Connection,
    Response,
    declared_size,
    eight_bit_refusal,
    recipient_failure,
    transaction_commands,
)
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply

TRACE = TraceInfo("sid7", "client.test", "192.0.2.1", None, "mx.test", "ESMTPSA")
USER, PASSWORD = "relay-user", "s3cret pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Smarthost:
    """What the test server saw, and how it answers."""

    port: int = 0
    data_reply: str = "250 2.0.0 queued"
    data_delay: float = 0.0  # seconds before the reply to the data
    refuse: str = "refused"  # RCPT of a local part starting with this gets 550
    mails: int = 0
    delivered: list[dict[str, Any]] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)
    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.mails += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.mail_options.append(list(options))
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith(self.refuse):
            return "550 5.1.1 no such user here"
        if address.startswith("later"):
            return "452 4.2.2 mailbox full, try later"
        envelope.rcpt_tos.append(address)
        self.rcpt_options.append(list(options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.data_delay)
        if self.data_reply.startswith("250"):
            self.delivered.append(
                {
                    "from": envelope.mail_from,
                    "to": list(envelope.rcpt_tos),
                    "data": envelope.original_content,
                    "tls": session.ssl is not None,
                    "auth": session.authenticated,
                }
            )
        return self.data_reply


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def password_file(tmp_path: Path) -> str:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    return str(path)


def start(handler: Smarthost, tls: ssl.SSLContext | None, utf8: bool = False) -> Controller:
    handler.port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=handler.port,
        tls_context=tls,
        require_starttls=tls is not None,
        authenticator=authenticator,
        auth_require_tls=tls is not None,
        enable_SMTPUTF8=utf8,
    )
    controller.start()
    return controller


@pytest.fixture
def smarthost(ca: trustme.CA) -> Iterator[Smarthost]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    handler = Smarthost()
    controller = start(handler, tls)
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def plain_smarthost() -> Iterator[Smarthost]:
    handler = Smarthost()
    controller = start(handler, None)
    try:
        yield handler
    finally:
        controller.stop()


MESSAGE = b"Received: from x\r\nSubject: hi\r\n\r\n.dot line\r\n" + b"y" * 70 + b"\r\n"


@dataclass
class Spooled:
    """What a destination reads of a spooled message."""

    path: str
    size: int
    no_bare_cr: bool = False  # as for BDAT data: line ends made CRLF on the wire

    def read_head(self, limit: int) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(limit)


def deliver(
    config: SmtpConfig, tmp_path: Path, *locals_: str, notify: tuple[str, ...] = ()
) -> list[RecipientResult]:
    spool = tmp_path / "msg.spool"
    spool.write_bytes(MESSAGE)

    rcpts = [Recipient(Address(name, "remote.test"), notify) for name in locals_]
    env = Envelope(sender=Address("user", "mx.test"), recipients=rcpts, body="8BITMIME")
    dest = SmarthostDestination(config, "mx.test")
    results = asyncio.run(dest.deliver(env, TRACE, Spooled(str(spool), len(MESSAGE)), rcpts))
    assert [r.recipient for r in results] == rcpts
    return results


def codes(results: list[RecipientResult]) -> list[tuple[int, str | None]]:
    return [(r.reply.code, r.reply.enhanced) for r in results]


def test_accepted_over_verified_tls_with_auth(
    smarthost: Smarthost, cafile: str, password_file: str, tmp_path: Path
) -> None:
    config = SmtpConfig(
        "127.0.0.1", smarthost.port, cafile=cafile, username=USER, password_file=password_file
    )
    results = deliver(config, tmp_path, "a", "b")
    assert codes(results) == [(250, "2.0.0")] * 2
    (mail,) = smarthost.delivered
    assert mail["from"] == "user@mx.test"
    assert mail["to"] == ["a@remote.test", "b@remote.test"]
    assert mail["data"] == MESSAGE  # dot-stuffing undone by the server: the same bytes
    assert mail["tls"] and mail["auth"]


def test_temporary_refusal_after_data(smarthost: Smarthost, cafile: str, tmp_path: Path) -> None:
    smarthost.data_reply = "452 4.3.1 disk full, later"
    results = deliver(SmtpConfig("127.0.0.1", smarthost.port, cafile=cafile), tmp_path, "a", "b")
    assert codes(results) == [(451, "4.3.1")] * 2  # the smarthost's status, our code
    assert "452 4.3.1 disk full, later" in results[0].reply.text


def test_permanent_refusal_after_data(smarthost: Smarthost, cafile: str, tmp_path: Path) -> None:
    smarthost.data_reply = "554 5.7.1 spam"
    results = deliver(SmtpConfig("127.0.0.1", smarthost.port, cafile=cafile), tmp_path, "a")
    assert codes(results) == [(554, "5.7.1")]


def test_refused_recipient_fails_alone(smarthost: Smarthost, cafile: str, tmp_path: Path) -> None:
    config = SmtpConfig("127.0.0.1", smarthost.port, cafile=cafile)
    results = deliver(config, tmp_path, "refused-one", "fine")
    assert codes(results) == [(550, "5.1.1"), (250, "2.0.0")]
    assert smarthost.delivered[0]["to"] == ["fine@remote.test"]


def test_the_reply_to_the_data_may_take_longer_than_a_command(
    smarthost: Smarthost, cafile: str, tmp_path: Path
) -> None:
    # RFC 5321 4.5.3.2.6: 10 minutes for it.  Given up after the command timeout, the
    # client got 451 while the smarthost queued the message: its retry was a copy.
    smarthost.data_delay = 1.5
    config = SmtpConfig("127.0.0.1", smarthost.port, cafile=cafile, timeout=0.5)
    assert codes(deliver(config, tmp_path, "a")) == [(250, "2.0.0")]
    assert len(smarthost.delivered) == 1


def test_a_recipient_deferred_at_rcpt_holds_the_data_back(
    smarthost: Smarthost, cafile: str, tmp_path: Path
) -> None:
    # The client is answered 451 for the whole message and sends it again: the data
    # sent now for the accepted recipient put a copy in the smarthost's queue at each
    # try (three tries, three copies).
    config = SmtpConfig("127.0.0.1", smarthost.port, cafile=cafile)
    results = deliver(config, tmp_path, "later-one", "fine", "refused-one")
    assert codes(results) == [(451, "4.2.2"), (451, "4.3.0"), (550, "5.1.1")]
    assert "another recipient was deferred" in results[1].reply.text
    assert smarthost.delivered == []


def test_starttls_required_but_not_offered(plain_smarthost: Smarthost, tmp_path: Path) -> None:
    results = deliver(SmtpConfig("127.0.0.1", plain_smarthost.port), tmp_path, "a", "b")
    assert codes(results) == [(451, "4.4.1")] * 2
    assert plain_smarthost.mails == 0 and plain_smarthost.delivered == []


def test_untrusted_certificate_sends_nothing(smarthost: Smarthost, tmp_path: Path) -> None:
    # No cafile: the system store does not know the test CA.
    results = deliver(SmtpConfig("127.0.0.1", smarthost.port), tmp_path, "a")
    assert codes(results) == [(451, "4.4.1")]
    assert smarthost.mails == 0


def test_wrong_password_sends_nothing(smarthost: Smarthost, cafile: str, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    config = SmtpConfig(
        "127.0.0.1", smarthost.port, cafile=cafile, username=USER, password_file=str(wrong)
    )
    assert codes(deliver(config, tmp_path, "a")) == [(451, "4.4.1")]
    assert smarthost.mails == 0


def test_opportunistic_falls_back_to_plain_text(plain_smarthost: Smarthost, tmp_path: Path) -> None:
    config = SmtpConfig("127.0.0.1", plain_smarthost.port, starttls="opportunistic")
    assert codes(deliver(config, tmp_path, "a")) == [(250, "2.0.0")]
    assert plain_smarthost.delivered[0]["tls"] is False


def test_no_credentials_in_plain_text(
    plain_smarthost: Smarthost, password_file: str, tmp_path: Path
) -> None:
    config = SmtpConfig(
        "127.0.0.1",
        plain_smarthost.port,
        starttls="opportunistic",
        username=USER,
        password_file=password_file,
    )
    assert codes(deliver(config, tmp_path, "a")) == [(451, "4.4.1")]
    assert plain_smarthost.mails == 0


def test_unreachable_smarthost(tmp_path: Path) -> None:
    config = SmtpConfig("127.0.0.1", free_port(), timeout=5)
    assert codes(deliver(config, tmp_path, "a", "b")) == [(451, "4.4.1")] * 2


def test_unloadable_cafile_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^cafile: "):
        SmarthostDestination(SmtpConfig("h", cafile=str(tmp_path / "missing.pem")), "mx.test")



def test_notify_success_through_a_server_without_dsn_is_relayed(tmp_path: Path) -> None:
    # RFC 3461 5.2.3: NOTIFY cannot go on to a server that does not offer DSN, so the
    # success is ours to report, as "relayed".  (A server that offers DSN gets NOTIFY
    # and reports itself: tests/integration/test_dsn.py, with mailgate downstream.)
    handler = Smarthost()
    controller = start(handler, None)
    try:
        config = SmtpConfig("127.0.0.1", handler.port, starttls="opportunistic")
        results = deliver(config, tmp_path, "a", notify=("SUCCESS", "FAILURE"))
    finally:
        controller.stop()
    assert codes(results) == [(250, "2.0.0")]
    assert results[0].action == "relayed"
    assert handler.rcpt_options == [[]]  # nothing it could not parse


@pytest.mark.parametrize(
    ("utf8", "to", "options"),
    [(False, "a@xn--bcher-kva.example", []), (True, "a@bücher.example", ["SMTPUTF8"])],
)
def test_a_domain_in_u_labels_goes_as_a_labels_to_a_server_without_smtputf8(
    tmp_path: Path, utf8: bool, to: str, options: list[str]
) -> None:
    handler = Smarthost()
    controller = start(handler, None, utf8=utf8)
    try:
        spool = tmp_path / "msg.spool"
        spool.write_bytes(MESSAGE)
        rcpts = [Recipient(Address("a", "bücher.example"))]
        env = Envelope(sender=Address("user", "mx.test"), recipients=rcpts)  # not SMTPUTF8 mail
        config = SmtpConfig("127.0.0.1", handler.port, starttls="off")
        dest = SmarthostDestination(config, "mx.test")

        results = asyncio.run(dest.deliver(env, TRACE, Spooled(str(spool), len(MESSAGE)), rcpts))
        assert codes(results) == [(250, "2.0.0")]
        (mail,) = handler.delivered
        assert mail["to"] == [to]
        assert handler.mail_options == [[*options, f"SIZE={len(MESSAGE)}"]]
    finally:
        controller.stop()


@pytest.mark.parametrize(
    ("sender", "declared", "message", "without", "with_smtputf8"),
    [
        ("jörg", True, b"Subject: hi\r\n\r\nx\r\n", (554, "5.6.7"), True),
        ("user", True, "Subject: café\r\n\r\nx\r\n".encode(), (554, "5.6.9"), True),
        # declared, but nothing in it needs SMTPUTF8: it goes without
        ("user", True, "Subject: hi\r\n\r\ncafé au lait\r\n".encode(), (250, "2.0.0"), True),
        # BDAT data keeps bare LF line ends: the header section still ends at the
        # first empty line, and the 8-bit text after it is body
        ("user", True, "Subject: hi\n\ncafé\n".encode(), (250, "2.0.0"), True),
        # raw 8-bit header fields sent without SMTPUTF8 go on as they came
        ("user", False, "Subject: café\r\n\r\nx\r\n".encode(), (250, "2.0.0"), False),
    ],
)
def test_a_message_that_needs_smtputf8_is_not_sent_to_a_server_without_it(
    tmp_path: Path, sender: str, declared: bool, message: bytes, without: tuple[int, str],
    with_smtputf8: bool,
) -> None:
    # RFC 6531 3.2: of an SMTPUTF8 message, a non-ASCII local part or UTF-8 header
    # fields cannot go to such a server; 8-bit body text can (8BITMIME).
    spool = tmp_path / "msg.spool"
    spool.write_bytes(message)

    for utf8, expected in ((False, without), (True, (250, "2.0.0"))):
        handler = Smarthost()
        controller = start(handler, None, utf8=utf8)
        try:
            rcpts = [Recipient(Address("a", "remote.test"))]
            env = Envelope(sender=Address(sender, "mx.test"), recipients=rcpts, body="8BITMIME",
                           smtputf8=declared)
            config = SmtpConfig("127.0.0.1", handler.port, starttls="off")
            dest = SmarthostDestination(config, "mx.test")
            results = asyncio.run(
                dest.deliver(env, TRACE, Spooled(str(spool), len(message)), rcpts)
            )
            assert codes(results) == [expected]
            assert len(handler.delivered) == (expected[0] == 250)
            if utf8:
                assert ("SMTPUTF8" in handler.mail_options[0]) == with_smtputf8
            else:
                assert handler.mails == (expected[0] == 250)  # refused before MAIL
        finally:
            controller.stop()


SMUGGLING = (
    b"Subject: bdat\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@bank.test>\r\n"
    b"RCPT TO:<victim@remote.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n"
)


def test_bare_line_ends_of_bdat_data_cannot_smuggle_a_message(tmp_path: Path) -> None:
    # aiosmtpd, like many servers, takes a bare LF as a line end: data taken by BDAT
    # and sent on as it came would end its DATA at <LF>.<CRLF>, and the rest would be
    # a second transaction.  RFC 5321 2.3.8: a client sends line ends only as CRLF.
    handler = Smarthost()
    controller = start(handler, None)
    try:
        spool = tmp_path / "msg.spool"
        spool.write_bytes(SMUGGLING)
        rcpts = [Recipient(Address("a", "remote.test"))]
        env = Envelope(sender=Address("user", "mx.test"), recipients=rcpts, chunked=True)
        dest = SmarthostDestination(SmtpConfig("127.0.0.1", handler.port, starttls="off"),
                                    "mx.test")
        results = asyncio.run(
            dest.deliver(env, TRACE, Spooled(str(spool), len(SMUGGLING)), rcpts)
        )
        assert codes(results) == [(250, "2.0.0")]
        assert handler.mails == 1
        (mail,) = handler.delivered
        assert mail["to"] == ["a@remote.test"]
        assert mail["data"] == SMUGGLING.replace(b"hello\n", b"hello\r\n")
        # RFC 1870: SIZE= is what is sent, line ends mended (it said the spool's size)
        assert f"SIZE={len(mail['data'])}" in handler.mail_options[0]
    finally:
        controller.stop()


def test_replies_injected_after_the_220_to_starttls_are_not_believed(
    tmp_path: Path, ca: trustme.CA, cafile: str
) -> None:
    # A man in the middle answers STARTTLS with 220 and, in the same plain-text write,
    # the replies to what we will send inside TLS; the real server (here the same
    # one, with a certificate we trust) then refuses the recipient inside TLS.  Read
    # as TLS replies, the injected ones made the refused message look delivered.
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    inside_tls: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 evil ESMTP\r\n")
            lines.readline()  # EHLO
            conn.sendall(b"250-evil\r\n250 STARTTLS\r\n")
            lines.readline()  # STARTTLS
            conn.sendall(b"220 go\r\n250 ok\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
                         b"354 go\r\n250 2.0.0 queued (forged)\r\n")
            try:
                with tls.wrap_socket(conn, server_side=True) as secure, \
                        secure.makefile("rb") as tls_lines:
                    answers = {b"RCPT": b"550 5.1.1 no such user\r\n",
                               b"DATA": b"554 5.5.1 no valid recipients\r\n",
                               b"QUIT": b"221 bye\r\n"}
                    while line := tls_lines.readline():
                        inside_tls.append(line)
                        secure.sendall(answers.get(line[:4], b"250 ok\r\n"))
            except (ssl.SSLError, OSError):
                pass  # the client gave up before or during the handshake

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        config = SmtpConfig("127.0.0.1", port, starttls="require", cafile=cafile, timeout=10)
        results = deliver(config, tmp_path, "someone")
        assert codes(results) == [(451, "4.4.1")]
    finally:
        thread.join(15)
        listener.close()
    assert inside_tls == []  # gave up at the injection, before any command in TLS


def test_a_downstream_refusal_keeps_its_own_status() -> None:
    # 5.2.2 "mailbox full" as 5.1.1 "no such user" would have a mailing list drop the
    # recipient; a status of another class, or none, leaves ours
    rcpt = Recipient(Address("a", "remote.test"))
    full = recipient_failure(rcpt, Response(552, ("5.2.2 over quota",)))
    assert (full.code, full.enhanced) == (550, "5.2.2")
    later = recipient_failure(rcpt, Response(452, ("4.2.2 over quota, later",)))
    assert (later.code, later.enhanced) == (451, "4.2.2")
    odd = recipient_failure(rcpt, Response(550, ("4.2.2 mixed up",)))
    assert (odd.code, odd.enhanced) == (550, "5.0.0")
    bare = recipient_failure(rcpt, Response(552, ("Mailbox full",)))
    assert (bare.code, bare.enhanced) == (550, "5.0.0")  # not "no such user"


def _offering(*keywords: str) -> Any:
    conn = Connection.__new__(Connection)  # the commands need only what it offers
    conn.extensions = dict.fromkeys(keywords, "")
    return conn


def test_a_utf8_orcpt_is_passed_on_in_its_own_forms() -> None:
    # RFC 6533 3: a utf-8 ORCPT is utf-8-addr-xtext (\x{HEX}) or, with SMTPUTF8,
    # utf-8-addr-unitext; RFC 3461 xtext "+C3+B6" is no form of it (a downstream
    # reported the original recipient as the literal "carl+C3+B6@...")
    original = "utf-8;carl\u00f6@b\u00fccher.test"
    rcpt = Recipient(Address("r1", "remote.test"), ("FAILURE",), original)
    plain = Recipient(Address("r2", "remote.test"), (), "rfc822;a+b=c@d.test")
    env = Envelope(sender=Address("s", "example.org"), recipients=[rcpt, plain])
    _, rcpts = transaction_commands(_offering("DSN"), env, 10, [rcpt, plain])
    assert rcpts == [
        "RCPT TO:<r1@remote.test> NOTIFY=FAILURE ORCPT=utf-8;carl\\x{F6}@b\\x{FC}cher.test",
        "RCPT TO:<r2@remote.test> ORCPT=rfc822;a+2Bb+3Dc@d.test",
    ]
    env.smtputf8 = True
    _, rcpts = transaction_commands(_offering("DSN", "SMTPUTF8"), env, 10, [rcpt])
    assert rcpts == [f"RCPT TO:<r1@remote.test> NOTIFY=FAILURE ORCPT={original}"]


def test_8bit_data_goes_only_to_a_server_that_offers_8bitmime(tmp_path: Path) -> None:
    # RFC 5321 2.4 / RFC 6152 3: it went as raw 8-bit octets (and without BODY=) to
    # a Postfix that did not offer 8BITMIME
    eight = tmp_path / "8bit"
    eight.write_bytes("Subject: x\r\n\r\nGrüße\r\n".encode())
    plain = tmp_path / "7bit"
    plain.write_bytes(b"Subject: x\r\n\r\nhello\r\n")

    def refusal(keywords: tuple[str, ...], body: str, path: Path) -> object:
        env = Envelope(sender=Address("s", "example.org"), body=body)
        return asyncio.run(eight_bit_refusal(_offering(*keywords), env, str(path)))

    refused = refusal(("DSN",), "8BITMIME", eight)
    assert isinstance(refused, Reply) and (refused.code, refused.enhanced) == (554, "5.6.3")
    assert refusal(("DSN",), "BINARYMIME", eight) is not None  # text lines, still 8-bit
    assert refusal(("DSN",), "8BITMIME", plain) is None  # declared, but 7-bit after all
    assert refusal(("8BITMIME",), "8BITMIME", eight) is None
    assert refusal(("DSN",), "7BIT", eight) is None  # its client's claim: as it came


class _Scripted:
    """A one-connection SMTP server on loopback that answers each command line by
    ``answers`` (keyed by its first four octets, "." for the end of the data; 250
    otherwise).  With an "@" answer it sends that at the first line of the data and
    closes the connection (a server refusing a message as it comes)."""

    def __init__(self, answers: dict[str, bytes | None]) -> None:
        self.answers = answers
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 smarthost.test ESMTP\r\n")
            in_data = False
            while line := lines.readline():
                key = ("." if line == b".\r\n" else "@") if in_data else line[:4].decode()
                if key == "@":
                    if "@" in self.answers:
                        with contextlib.suppress(OSError):
                            conn.sendall(self.answers["@"])
                        return
                    continue
                answer = self.answers.get(key, b"354 go\r\n" if key == "DATA" else
                                          b"250 2.0.0 ok\r\n")
                in_data = key == "DATA" and answer.startswith(b"354")
                conn.sendall(answer)

    def close(self) -> None:
        self.thread.join(15)
        self.listener.close()


def _through(
    server: _Scripted, tmp_path: Path, message: bytes = MESSAGE, timeout: float = 10
) -> list[RecipientResult]:
    """One message to one recipient through ``server`` (plain text)."""
    spool = tmp_path / "msg.spool"
    spool.write_bytes(message)
    rcpts = [Recipient(Address("a", "remote.test"))]
    env = Envelope(sender=Address("user", "mx.test"), recipients=rcpts)
    dest = SmarthostDestination(SmtpConfig("127.0.0.1", server.port, starttls="off",
                                           timeout=timeout), "mx.test")
    try:
        return asyncio.run(dest.deliver(env, TRACE, Spooled(str(spool), len(message)), rcpts))
    finally:
        server.close()


def test_a_reply_without_text_is_a_reply(tmp_path: Path) -> None:
    # RFC 5321 4.2: Reply-code [ SP textstring ] CRLF.  A bare "250" to the end of the
    # data was taken for garbage: 451 to the client, whose retry made a second copy.
    results = _through(_Scripted({".": b"250\r\n"}), tmp_path)
    assert codes(results) == [(250, "2.0.0")]


def test_a_reply_of_mixed_codes_quotes_only_what_has_the_last_code(tmp_path: Path) -> None:
    # RFC 5321 4.2.1 says every line has the same code; when not, the last decides,
    # and the text passed on must not pair its code with another line's words
    results = _through(_Scripted({"MAIL": b"250-2.1.0 fine\r\n550 5.7.1 no\r\n"}), tmp_path)
    assert codes(results) == [(554, "5.7.1")]
    assert "fine" not in str(results[0].reply) and "5.7.1 no" in str(results[0].reply)


def test_a_refusal_before_the_end_of_the_data_is_the_outcome(tmp_path: Path) -> None:
    # A server refusing a message as it comes (too big) answers and closes; the write
    # that failed then (a RuntimeError from uvloop, logged as a bug) made it a 451,
    # and the client retried a message the server will never take.
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8_000
    results = _through(_Scripted({"@": b""}), tmp_path, big)
    assert codes(results) == [(451, "4.4.1")]  # closed without a word: try again
    results = _through(_Scripted({"@": b"554 5.3.4 message too big\r\n"}), tmp_path, big)
    assert codes(results) == [(554, "5.3.4")]


def test_a_password_file_the_servers_user_cannot_read_is_named(
    password_file: str, tmp_path: Path
) -> None:
    # read at each connection, after privileges are dropped: root reading it at start
    # proved nothing, and every relayed message got 451
    nobody = (65534, 65534)
    os.chmod(password_file, 0o600)
    dest = SmarthostDestination(SmtpConfig("127.0.0.1", 25, username=USER,
                                           password_file=password_file), "mx.test")
    assert dest.problem() is None  # (this process made it)
    assert dest.problem(nobody) == (f"{password_file} is not readable by the server's user: "
                                    "every message relayed here is answered 451")
    os.chmod(password_file, 0o644)
    assert dest.problem(nobody) is None
    os.unlink(password_file)
    assert dest.problem() == (f"{password_file} is not a file: every message relayed here "
                              "is answered 451")


def test_a_reply_that_does_not_come_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # "reading reply: TimeoutError" said nothing of which: only a reply to the end of
    # the data not read can mean the server has the message all the same
    with caplog.at_level(logging.WARNING, logger="mailgate.delivery.smarthost"):
        results = _through(_Scripted({"MAIL": b""}), tmp_path, timeout=0.5)
    assert codes(results) == [(451, "4.4.1")]
    assert "reading the reply to MAIL: TimeoutError" in caplog.text, caplog.text


@pytest.mark.parametrize(
    ("data", "size"),
    [(b"a\nb", 6), (b"a\r\nb\r\n", 6), (b"a\rb\r", 6), (b"", 2), (b"x\r", 3)],
)
def test_the_declared_size_of_bdat_text_is_what_is_sent(
    tmp_path: Path, data: bytes, size: int
) -> None:
    spool = tmp_path / "msg.spool"
    spool.write_bytes(data)
    env = Envelope(sender=Address("user", "mx.test"), chunked=True)
    got = asyncio.run(declared_size(_offering("SIZE"), env, Spooled(str(spool), len(data))))
    assert got == size
    # data taken by DATA is sent as it is
    sent_as_is = Spooled(str(spool), len(data), no_bare_cr=True)
    assert asyncio.run(declared_size(_offering("SIZE"), env, sent_as_is)) == len(data)
