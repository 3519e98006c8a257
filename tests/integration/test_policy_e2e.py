"""End to end: the upas policy over the wire, for an untrusted client.

DNS answers come from a real DNS server on loopback loaded with our own zones.
"""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib.server import DNSLogger, DNSServer

from tests.integration.server import (
    RunningServer,
    free_port,
    start_behind_proxy,
    start_server,
    wait_for,
)
from tests.policy.conftest import BASE_ZONES, ZoneResolver

UNTRUSTED = "[policy]\ntrusted_networks = []\n"


@pytest.fixture(scope="module")
def dns_address() -> Iterator[str]:
    server = DNSServer(ZoneResolver(BASE_ZONES), address="127.0.0.1", port=0,
                       logger=DNSLogger(logf=lambda _m: None))
    server.start_thread()
    try:
        yield f"127.0.0.1:{server.server.server_address[1]}"
    finally:
        server.stop()
        server.server.server_close()


def _start(tmp_path: Path, dns: str, extra: str = "") -> RunningServer:
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        max_errors = 6

        [policy]
        trusted_networks = []
        dns_servers = ["{dns}"]
        dns_timeout = 1.0
        {extra}
    """)


def test_helo_sender_and_relay_checks(tmp_path: Path, dns_address: str) -> None:
    srv = _start(tmp_path, dns_address)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            code, text = smtp.ehlo("host.example.com")
            assert (code, text[:5]) == (550, b"5.7.1")  # RFC 2606 name, session goes on
            code, text = smtp.ehlo("nodot")
            assert (code, text[:5]) == (550, b"5.7.1")
            assert smtp.ehlo("client.sender.lab")[0] == 250
            assert smtp.docmd("MAIL", "FROM:<x@nx.sender.lab>")[:2] == (
                550, b"5.1.8 Sender domain must exist: nx.sender.lab")
            assert smtp.docmd("MAIL", "FROM:<x@nullmx.sender.lab>")[0] == 550
            # a DNS failure is temporary and no fault of the client's: not counted
            assert smtp.docmd("MAIL", "FROM:<x@y.servfail.sender.lab>")[:1] == (451,)
            assert smtp.docmd("MAIL", "FROM:<x@mx.sender.lab>")[0] == 250
            assert smtp.docmd("RCPT", "TO:<someone@elsewhere.lab>")[:2] == (
                550, b"5.7.1 Relaying denied")
            assert smtp.docmd("RCPT", 'TO:<"root@elsewhere.lab"@localhost>')[0] == 550
            # The error budget (max_errors = 6) is spent: 421 and the connection closes.
            code, text = smtp.docmd("NOOP")
            assert (code, text[:5]) == (421, b"4.7.0")
    finally:
        srv.stop()


def test_helo_hangup_mode(tmp_path: Path, dns_address: str) -> None:
    srv = _start(tmp_path, dns_address, 'helo_refusal = "hangup"')
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.recv(1024)
            sock.sendall(b"EHLO localhost\r\n")
            assert sock.recv(1024).startswith(b"421 4.7.1")
            assert sock.recv(1024) == b""
    finally:
        srv.stop()


def test_greylisting_over_the_wire(tmp_path: Path, dns_address: str) -> None:
    mport = free_port()
    srv = _start(tmp_path, dns_address, f"""
        [greylist]
        enabled = true
        min_delay = 0
        sqlite_path = "{tmp_path}/grey.sqlite"

        [metrics]
        listen = "127.0.0.1:{mport}"
    """)
    try:
        for expected in (451, 250):
            with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
                smtp.ehlo("client.sender.lab")
                smtp.docmd("MAIL", "FROM:<x@mx.sender.lab>")
                code, text = smtp.docmd("RCPT", "TO:<root@localhost>")
                assert code == expected, text
                if code == 451:
                    assert text.startswith(b"4.7.1")

        def counted() -> bytes:
            url = f"http://127.0.0.1:{mport}/metrics"
            return urllib.request.urlopen(url, timeout=10).read()

        # the decisions are counted (an "error" rate would show a store outage)
        assert wait_for(lambda: b'mailgate_greylist_total{outcome="passed"} 1.0' in counted())
        assert b'mailgate_greylist_total{outcome="new"} 1.0' in counted()
    finally:
        srv.stop()


def test_access_list_states(tmp_path: Path, dns_address: str) -> None:
    access = tmp_path / "access"
    access.write_text(
        "deny sender *@a.sender.lab\n"
        "block sender *@aaaa.sender.lab\n"
        "delay sender *@deep.sub.sender.lab\n"
    )
    quarantine = tmp_path / "quarantine"
    srv = _start(tmp_path, dns_address, f"""
        access_file = "{access}"
        blocked_disposition = "quarantine"
        quarantine_dir = "{quarantine}"
    """)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.sender.lab")
            code, text = smtp.docmd("MAIL", "FROM:<x@a.sender.lab>")
            # RFC 5321 4.3.2 lists no 554 for MAIL
            assert code == 550 and b"postmaster@mx.mailgate.test" in text
            code, text = smtp.docmd("MAIL", "FROM:<x@deep.sub.sender.lab>")
            assert (code, text[:5]) == (451, b"4.7.1")
            assert smtp.docmd("MAIL", "FROM:<x@aaaa.sender.lab>")[0] == 250
            assert smtp.docmd("RCPT", "TO:<root@localhost>")[0] == 250
            code, text = smtp.data(b"Subject: spam\r\n\r\nbuy now\r\n")
            assert (code, text[:5]) == (554, b"5.7.1")
        assert srv.messages("root") == []
        assert len(list(quarantine.iterdir())) == 1
    finally:
        srv.stop()


def test_the_received_field_names_the_client_dns_confirms(
    tmp_path: Path, dns_address: str
) -> None:
    """Through a PROXY header the client is 192.0.2.25, whose PTR record names
    mail.sender.lab and whose A record points back; 192.0.2.26's PTR names a host
    that is not it."""
    srv, port = start_behind_proxy(
        tmp_path,
        f'dns_servers = ["{dns_address}"]\ndns_timeout = 1.0\nverify_sender_domain = false',
    )
    try:
        for ip in ("192.0.2.25", "192.0.2.26"):
            with socket.create_connection((srv.host, port), timeout=10) as sock:
                sock.sendall(f"PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n".encode())
                reader = sock.makefile("rb")
                assert reader.readline().startswith(b"220 ")
                sock.sendall(b"HELO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
                             b"RCPT TO:<root@localhost>\r\nDATA\r\n")
                assert [reader.readline()[:3] for _ in range(4)] == [b"250"] * 3 + [b"354"]
                sock.sendall(b"Subject: traced\r\n\r\nhi\r\n.\r\n")
                assert reader.readline().startswith(b"250 ")
        # one that leaves before HELO: its lookup is cancelled, nothing goes wrong
        with socket.create_connection((srv.host, port), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.25 127.0.0.1 40000 25\r\nQUIT\r\n")
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            assert reader.readline().startswith(b"221 ")
        confirmed, forged = srv.messages("root")
        assert b"Received: from client.mailgate.org (mail.sender.lab [192.0.2.25])" in confirmed
        assert b"Received: from client.mailgate.org (unknown [192.0.2.26])" in forged
        helo = [line for line in srv.log().splitlines() if "event=helo" in line]
        assert "rdns=mail.sender.lab" in helo[0] and "rdns" not in helo[1]
        log = srv.log()
        assert "level=error" not in log and "Traceback" not in log
        assert "Task was destroyed" not in log
    finally:
        srv.stop()


def test_a_silent_blocklist_is_waited_for_within_the_greeting_pause(
    tmp_path: Path, dns_address: str
) -> None:
    # A DNSBL zone that never answers costs dns_timeout at connect; the greeting pause
    # used to come after it, on top: 1.5 s + 1.5 s here.  It counts from the connect now.
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        greet_pause = 1.5
        [policy]
        trusted_networks = []
        dns_servers = ["{dns_address}"]
        dns_timeout = 1.5
        dnsbl_zones = ["slow.lab"]
        reverse_lookup = false
    """)
    try:
        started = time.monotonic()
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            assert sock.recv(1024).startswith(b"220 ")
            waited = time.monotonic() - started
        assert 1.4 < waited < 2.5, waited  # the pause, not the pause plus the timeout
        assert "dnsbl lookup failed zone=slow.lab" in srv.log()
    finally:
        srv.stop()
