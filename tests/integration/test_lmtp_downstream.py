"""End to end with a real Dovecot LMTP downstream: refusals reach the client at RCPT."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.delivery.dovecot_fixture import DOMAIN, Dovecot
from tests.integration.server import start_server


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    server = Dovecot()
    try:
        yield server
    finally:
        server.remove()


def test_downstream_decides_at_rcpt_and_gets_the_message(tmp_path: Path, dovecot: Dovecot) -> None:
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"

        [delivery]
        maildir_root = "{tmp_path}/maildir"
        local_domains = ["{DOMAIN}"]
        catch_all = {{ "{DOMAIN}" = "anyone" }}

        [delivery.domains]
        "{DOMAIN}" = "dovecot"

        [delivery.destinations.dovecot.lmtp]
        address = "127.0.0.1:{dovecot.port}"
    """)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.docmd("MAIL", "FROM:<sender@client.mailgate.org>")
            assert smtp.docmd("RCPT", f"TO:<alice@{DOMAIN}>")[0] == 250
            code, text = smtp.docmd("RCPT", f"TO:<mallory@{DOMAIN}>")
            assert (code, text[:5]) == (550, b"5.1.1")
            code, text = smtp.data(b"Subject: via lmtp\r\n\r\nthrough dovecot\r\n")
            assert code == 250
        stored = list((dovecot.dir / "mail" / "alice").rglob("new/*"))
        assert len(stored) == 1 and b"through dovecot" in stored[0].read_bytes()
        dovecot.stop()
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.docmd("MAIL", "FROM:<sender@client.mailgate.org>")
            code, text = smtp.docmd("RCPT", f"TO:<bob@{DOMAIN}>")
            assert code == 451 and text.startswith(b"4.4.0")  # cannot verify now: retry
    finally:
        srv.stop()
