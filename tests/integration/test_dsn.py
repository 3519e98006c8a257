"""Mixed delivery results: 250 to the client and an RFC 3464 report to the sender."""

from __future__ import annotations

import email
import email.policy
import smtplib
from pathlib import Path

from tests.integration.server import start_server


def test_partial_refusal_is_reported_to_the_sender(tmp_path: Path) -> None:
    mailer = tmp_path / "refuse.sh"
    mailer.write_text("#!/bin/sh\ncat >/dev/null\necho 'no such list' >&2\nexit 67\n")
    mailer.chmod(0o755)
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"

        [delivery]
        maildir_root = "{tmp_path}/maildir"
        local_users = ["alice", "lists"]

        [delivery.users]
        "lists@localhost" = "listpipe"

        [delivery.destinations.listpipe.pipe]
        command = ["{mailer}", "--", "{{recipients}}"]
    """)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            refused = smtp.sendmail(
                "alice@localhost", ["root@localhost", "lists@localhost"],
                b"Subject: mixed\r\n\r\nhello\r\n",
            )
            assert refused == {}
        assert len(srv.messages("root")) == 1
        [report] = srv.messages("alice")
        msg = email.message_from_bytes(report, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"
        assert "lists@localhost" in report.decode()
        assert "Status: 5." in report.decode()
        # A null sender cannot be told: the whole message is deferred instead.
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.docmd("MAIL", "FROM:<>")
            smtp.docmd("RCPT", "TO:<root@localhost>")
            smtp.docmd("RCPT", "TO:<lists@localhost>")
            code, _ = smtp.data(b"Subject: bounce\r\n\r\nhello\r\n")
            assert 400 <= code < 500
    finally:
        srv.stop()
