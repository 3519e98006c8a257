"""End to end with a real Dovecot LMTP downstream: refusals reach the client at RCPT."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.delivery.dovecot_fixture import DOMAIN, Dovecot
from tests.delivery.test_smarthost import Smarthost
from tests.delivery.test_smarthost import start as start_smarthost
from tests.integration.server import RunningServer, start_server


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    server = Dovecot()
    try:
        yield server
    finally:
        server.remove()


def _front(tmp_path: Path, lmtp: str, delivery: str = "", more: str = "") -> RunningServer:
    """mailgate with DOMAIN's mail on the LMTP server at ``lmtp``; ``delivery``: more
    lines of [delivery], ``more``: more tables."""
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"

        [delivery]
        maildir_root = "{tmp_path}/maildir"
        local_domains = ["{DOMAIN}"]
        {delivery}

        [delivery.domains]
        "{DOMAIN}" = "dovecot"

        [delivery.destinations.dovecot.lmtp]
        address = "{lmtp}"
        {more}
    """)


def test_downstream_decides_at_rcpt_and_gets_the_message(tmp_path: Path, dovecot: Dovecot) -> None:
    srv = _front(tmp_path, f"127.0.0.1:{dovecot.port}",
                 f'catch_all = {{ "{DOMAIN}" = "anyone" }}')
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


def test_a_relay_deferring_at_rcpt_holds_back_the_lmtp_copy(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    # The client is told 4xx and sends the whole message again: a copy Dovecot had
    # taken meanwhile would be a second one with every retry.
    handler = Smarthost()
    controller = start_smarthost(handler, None)
    srv = _front(tmp_path, f"127.0.0.1:{dovecot.port}", 'relay = "next"', (
        "[delivery.destinations.next.smtp]\n"
        f'host = "127.0.0.1"\nport = {handler.port}\nstarttls = "off"'
    ))

    def send(*rcpts: str) -> tuple[int, bytes]:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.docmd("MAIL", "FROM:<sender@client.mailgate.org>")
            for rcpt in rcpts:
                assert smtp.docmd("RCPT", f"TO:<{rcpt}>")[0] == 250
            return smtp.data(b"Subject: both ways\r\n\r\nto dovecot and the relay\r\n")

    try:
        for _ in range(2):  # the client's first try and its retry
            code, text = send(f"alice@{DOMAIN}", "later@remote.mailgate.org")
            # the cause, the relay's own deferral, not the copy held back for it
            assert (code, text[:5]) == (451, b"4.2.2"), text
            assert dovecot.maildir_messages("alice") == []
        assert handler.delivered == []
        code, _ = send(f"alice@{DOMAIN}", "carol@remote.mailgate.org")
        assert code == 250
        assert len(dovecot.maildir_messages("alice")) == 1
        assert [d["to"] for d in handler.delivered] == [["carol@remote.mailgate.org"]]
    finally:
        srv.stop()
        controller.stop()


def test_a_downstreams_warning_names_the_session(tmp_path: Path) -> None:
    # deployment.md: every line of a session carries its sid, so that grep sid=...
    # gives it whole; a downstream's warning logged through the logging module had none
    srv = _front(tmp_path, f"unix:{tmp_path}/nobody-listens")
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=15) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.docmd("MAIL", "FROM:<a@client.mailgate.org>")
            assert smtp.docmd("RCPT", f"TO:<alice@{DOMAIN}>")[0] == 451
        log = srv.log()
        [sid] = re.findall(r"sid=(\S+) event=connect", log)
        [warning] = [line for line in log.splitlines() if "by LMTP: cannot connect" in line]
        assert f" sid={sid} event=log logger=mailgate.delivery.lmtp " in warning, warning
        # lines of no session still have none
        assert all("sid=" not in line for line in log.splitlines() if "event=started" in line)
    finally:
        srv.stop()
