"""End to end: BINARYMIME mail relayed on (RFC 3030 3).  Binary data goes only to a
next hop that offers BINARYMIME, by BDAT, every octet as it came; to one without, a
message of plain text lines goes as 8BITMIME and one with binary data is refused."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.integration.server import RunningServer, free_port, read_until, start_server

BINARY = b"Subject: bin\r\n\r\n\x00\x01\r\n\xff\nbare LF\rbare CR\r\n.\r\nend"
TEXT = b"Subject: text\r\n\r\ncaf\xc3\xa9\r\n.dot\r\n"


class Recorder:
    """aiosmtpd (which offers no BINARYMIME) as the smarthost: what it received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mail_options: list[list[str]] = []
        self.data: list[bytes] = []

    async def handle_MAIL(self, server, session, envelope, address, options):
        envelope.mail_from = address
        self.mail_options.append(list(options))
        return "250 2.1.0 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data.append(envelope.original_content)
        return "250 2.0.0 queued"


def front(tmp_path: Path, port: int) -> RunningServer:
    """mailgate relaying every remote recipient to 127.0.0.1:port (loopback is trusted)."""
    return start_server(tmp_path / "front", f"""
        [server]
        spool_dir = "{tmp_path}/front/spool"
        [delivery]
        maildir_root = "{tmp_path}/front/maildir"
        relay = "next"
        [delivery.destinations.next.smtp]
        host = "127.0.0.1"
        port = {port}
        starttls = "off"
    """)


def send_binarymime(server: RunningServer, body: bytes) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.recv(4096)
        sock.sendall(
            b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org> BODY=BINARYMIME\r\n"
            b"RCPT TO:<bob@remote.mailgate.org>\r\n"
            + f"BDAT {len(body)} LAST\r\n".encode() + body + b"QUIT\r\n"
        )
        return read_until(sock, b"\r\n221 ")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=handler.port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


def test_binary_data_reaches_a_binarymime_server_octet_for_octet(tmp_path: Path) -> None:
    downstream = start_server(tmp_path / "down", f"""
        [server]
        spool_dir = "{tmp_path}/down/spool"
        [delivery]
        maildir_root = "{tmp_path}/down/maildir"
        local_domains = ["remote.mailgate.org"]
        system_users = false
        local_users = ["bob"]
    """)
    relay = front(tmp_path, downstream.port)
    try:
        got = send_binarymime(relay, BINARY)
        assert b"\r\n250 2.0.0 OK" in got, got
        (stored,) = downstream.messages("bob")
        assert stored.endswith(b"\r\n" + BINARY)  # after the header fields we added
        assert b"Received: from client.mailgate.org" in stored  # the front's field
    finally:
        relay.stop()
        downstream.stop()


def test_binary_data_is_refused_for_a_server_without_binarymime(
    tmp_path: Path, recorder: Recorder
) -> None:
    relay = front(tmp_path, recorder.port)
    try:
        got = send_binarymime(relay, BINARY)
        assert b"\r\n554 5.6.3 " in got, got
        assert recorder.data == [] and recorder.mail_options == []
    finally:
        relay.stop()


def test_text_declared_binarymime_goes_as_8bitmime(tmp_path: Path, recorder: Recorder) -> None:
    relay = front(tmp_path, recorder.port)
    try:
        got = send_binarymime(relay, TEXT)
        assert b"\r\n250 2.0.0 OK" in got, got
        (options,) = recorder.mail_options
        assert "BODY=8BITMIME" in options
        (data,) = recorder.data
        assert data.endswith(b"\r\n" + TEXT)
    finally:
        relay.stop()
