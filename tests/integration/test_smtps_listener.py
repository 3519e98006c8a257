"""An smtps listener (RFC 8314 implicit TLS) admits, and reads a PROXY header, before
its TLS handshake: half-made handshakes count in the connection limits, are logged,
and time out with command_timeout."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.server import RunningServer, free_port, start_server, wait_for

HOST = "mx.mailgate.test"
MESSAGE = b"From: a@client.mailgate.org\r\nSubject: over smtps\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def srv(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[RunningServer, int, int]]:
    pair = tmp_path / "pair.pem"
    ca.issue_cert(HOST, "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pair))
    plain, proxied = free_port(), free_port()
    server = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        max_connections_per_ip = 1
        command_timeout = 2
        proxy_from = ["127.0.0.1/32"]

        [[listener]]
        address = "127.0.0.1:{plain}"
        role = "smtps"

        [[listener]]
        address = "127.0.0.1:{proxied}"
        role = "smtps"
        proxy_protocol = true

        [tls]
        cert = "{pair}"
        key = "{pair}"

        [policy]
        verify_sender_domain = false
        reverse_lookup = false
    """)
    yield server, plain, proxied
    server.stop()


def _context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def _events(server: RunningServer, name: str) -> list[str]:
    return [line for line in server.log().splitlines() if f" event={name} " in line]


def _closed_unanswered(sock: socket.socket) -> bool:
    """Closed with no reply (reset, when what the client sent was left unread)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_a_handshake_under_way_counts_in_the_limits(
    srv: tuple[RunningServer, int, int], ca: trustme.CA
) -> None:
    server, port, _ = srv
    with socket.create_connection(("127.0.0.1", port), timeout=10):  # connected, no TLS yet
        time.sleep(0.3)
        # the second connection from the address is closed before any handshake
        with pytest.raises((ssl.SSLError, OSError)):
            smtplib.SMTP_SSL("127.0.0.1", port, context=_context(ca), timeout=10)
    [refused] = _events(server, "refused")
    assert "reason=closing.too_many_from_client" in refused and 'tls="not started"' in refused
    # the held one's handshake failed when it hung up: logged, and its place given back
    assert wait_for(lambda: any("outcome=failed" in x for x in _events(server, "tls")))
    with smtplib.SMTP_SSL("127.0.0.1", port, context=_context(ca), timeout=10) as smtp:
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"], MESSAGE)
    [stored] = server.messages("root")
    assert b"with ESMTPS" in stored


def test_a_handshake_that_never_comes_times_out(
    srv: tuple[RunningServer, int, int], ca: trustme.CA
) -> None:
    server, port, _ = srv
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(100) == b""  # closed by the server, command_timeout = 2
        assert time.monotonic() - started < 8
    [failed] = _events(server, "tls")
    assert "outcome=failed" in failed
    # its place in the per-address limit is free again
    with smtplib.SMTP_SSL("127.0.0.1", port, context=_context(ca), timeout=10) as smtp:
        assert smtp.noop()[0] == 250


def test_proxy_header_before_tls(srv: tuple[RunningServer, int, int], ca: trustme.CA) -> None:
    server, _, port = srv
    for pieces in ([b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 465\r\n"],
                   [b"PROXY TCP4 198.51.100.7 127.0", b".0.1 40000 465\r\n"]):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        for piece in pieces:
            raw.sendall(piece)
            time.sleep(0.2)
        with _context(ca).wrap_socket(raw, server_hostname=HOST) as tls:
            smtp = smtplib.SMTP()
            smtp.sock = tls
            smtp.file = None
            assert smtp.getreply()[0] == 220
            smtp.sendmail("a@client.mailgate.org", ["root@localhost"], MESSAGE)
            smtp.quit()
    stored = server.messages("root")
    assert len(stored) == 2 and all(b"[198.51.100.7]" in m for m in stored)
    connects = _events(server, "connect")
    assert len(connects) == 2 and all("ip=198.51.100.7" in x for x in connects)
    # a header that is no PROXY header: 421 in plain text, as the plain listeners say it
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"PROXY NONSENSE\r\n")
        assert raw.recv(1024).startswith(b"421 4.7.0 ")
    # from an address outside proxy_from: closed before anything
    with socket.socket() as raw:
        raw.bind(("127.0.0.2", 0))
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        raw.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 465\r\n")
        assert _closed_unanswered(raw)
    reasons = [x for x in _events(server, "proxy") if "outcome=refused" in x]
    assert len(reasons) == 2 and "not an address of server.proxy_from" in reasons[1]


def test_shutdown_drops_handshakes_under_way(srv: tuple[RunningServer, int, int]) -> None:
    server, port, _ = srv
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        time.sleep(0.3)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 5


def test_a_port_465_handshake_is_logged_as_a_starttls_one_is(
    srv: tuple[RunningServer, int, int], ca: trustme.CA
) -> None:
    # (its version and cipher were on no line, and the handshake counter, which the
    # docs say counts port 465's, counted only STARTTLS)
    server, plain, _ = srv
    with smtplib.SMTP_SSL("127.0.0.1", plain, context=_context(ca), timeout=10) as smtp:
        assert smtp.noop()[0] == 250
    assert wait_for(lambda: _events(server, "close"))
    [tls] = _events(server, "tls")
    assert "outcome=ok" in tls and "version=TLSv1." in tls and "cipher=" in tls
