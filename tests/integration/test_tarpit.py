"""upas's slow-downs over the wire: the HELO delay (-D), the growing delay per refusal
(9front's tarpit) and the AUTH failure throttle.  The assertions are lower bounds on
deliberate delays (the feature itself), never speed targets."""

from __future__ import annotations

import base64
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.server import start_server


def test_helo_delay_and_growing_tarpit(tmp_path: Path) -> None:
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        helo_delay = 0.4
        tarpit_delay = 0.2
        tarpit_max_delay = 0.4

        [policy]
        trusted_networks = []
        verify_sender_domain = false
    """)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            started = time.monotonic()
            assert smtp.ehlo("client.mailgate.org")[0] == 250
            assert time.monotonic() - started >= 0.4
            smtp.docmd("MAIL", "FROM:<a@client.mailgate.org>")
            started = time.monotonic()
            for _ in range(3):  # 0.2 + 0.4 + 0.4 (capped)
                assert smtp.docmd("RCPT", "TO:<nobody-at-all@localhost>")[0] == 550
            assert time.monotonic() - started >= 1.0
        assert "errors=3" in srv.log()
    finally:
        srv.stop()


def test_auth_failures_are_throttled_then_cut_off(tmp_path: Path) -> None:
    users = tmp_path / "users"
    subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "passwd", "alice", "--users-file", str(users),
         "--stdin"],
        input="right password\n", text=True, check=True, capture_output=True,
    )
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        max_errors = 50

        [[listener]]
        address = "127.0.0.1:0"
        allow_plaintext_auth = true

        [auth]
        users_file = "{users}"
        throttle_after = 2
        throttle_close_after = 3
        failure_delay = 0.05
        failure_max_delay = 0.1
    """)
    wrong = base64.b64encode(b"\0alice\0wrong password").decode()
    try:
        with smtplib.SMTP(srv.host, srv.extra_ports[0], timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            codes = [smtp.docmd("AUTH", f"PLAIN {wrong}") for _ in range(3)]
            assert [c for c, _ in codes[:2]] == [535, 535]
            assert codes[2][0] == 454 and codes[2][1].startswith(b"4.7.0")
            code, text = smtp.docmd("AUTH", f"PLAIN {wrong}")
            assert (code, text[:5]) == (421, b"4.7.0")
        assert "wrong password" not in srv.log() and wrong not in srv.log()
    finally:
        srv.stop()
