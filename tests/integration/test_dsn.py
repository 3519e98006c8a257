"""Mixed delivery results: 250 to the client and an RFC 3464 report to the sender."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import email.utils
import smtplib
import threading
from pathlib import Path

from aiosmtpd.controller import Controller

from tests.integration.server import RunningServer, free_port, start_server, wait_for


def _with_refusing_list(tmp_path: Path, local_users: list[str]) -> RunningServer:
    """A server where root gets mail into its maildir and lists@localhost goes to a
    mail processor that refuses every message for good (exit 67, "no such list")."""
    mailer = tmp_path / "refuse.sh"
    mailer.write_text("#!/bin/sh\ncat >/dev/null\necho 'no such list' >&2\nexit 67\n")
    mailer.chmod(0o755)
    users = ", ".join(f'"{u}"' for u in local_users)
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"

        [delivery]
        maildir_root = "{tmp_path}/maildir"
        local_users = [{users}]

        [delivery.users]
        "lists@localhost" = "listpipe"

        [delivery.destinations.listpipe.pipe]
        command = ["{mailer}", "--", "{{recipients}}"]
    """)


def _to_root_and_lists(srv: RunningServer, sender: str) -> tuple[int, bytes]:
    """One message from ``sender`` to root and to the refusing list: the reply to it."""
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        smtp.docmd("MAIL", f"FROM:{sender}")
        smtp.docmd("RCPT", "TO:<root@localhost>")
        smtp.docmd("RCPT", "TO:<lists@localhost>")
        return smtp.data(b"Subject: mixed\r\n\r\nhello\r\n")


def test_partial_refusal_is_reported_to_the_sender(tmp_path: Path) -> None:
    srv = _with_refusing_list(tmp_path, ["alice", "lists"])
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
        assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
        # RFC 3464 2.2.5: when the message arrived (within this test's minute)
        [per_message, _] = msg.get_payload()[1].get_payload()
        arrived = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
        assert abs((datetime.datetime.now(datetime.UTC) - arrived).total_seconds()) < 60
        # the refusal's words are on the session's own delivery line, not only elsewhere
        [refused_line] = [x for x in srv.log().splitlines()
                          if "event=delivery" in x and "to=lists@localhost" in x]
        assert "sid=" in refused_line and "reply=" in refused_line
        assert "no such list" in refused_line
        # RET=FULL (RFC 3461 4.3): the message itself comes back
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.sendmail("alice@localhost", ["root@localhost", "lists@localhost"],
                          b"Subject: full\r\n\r\nthe whole body\r\n", mail_options=["RET=FULL"])
        report = srv.messages("alice")[1]
        returned = email.message_from_bytes(report, policy=email.policy.default).get_payload()[2]
        assert returned.get_content_type() == "message/rfc822"
        assert b"the whole body" in report
        # A null sender is never bounced to, and no retry changes that: a 4xx would
        # have the client send it again and again, a copy each time for root.  The
        # refusal names who did not get it and says the others did.
        code, text = _to_root_and_lists(srv, "<>")
        assert code == 554
        said = text.decode()
        assert said.startswith("5.0.0 <lists@localhost>: 554 5.1.1 ")
        assert said.endswith(
            "5.0.0 Not delivered to the recipients above; the others have it, and no "
            "report could reach the sender"
        )
        assert len(srv.messages("root")) == 3  # this message's copy, once
    finally:
        srv.stop()


def test_a_report_refused_for_good_ends_in_a_refusal_not_a_retry(tmp_path: Path) -> None:
    # A remote sender and no relay: its report cannot go anywhere, now or later.
    srv = _with_refusing_list(tmp_path, ["lists"])
    try:
        code, text = _to_root_and_lists(srv, "<someone@remote.mailgate.org>")
        assert code == 554 and b"<lists@localhost>: 554 5.1.1" in text
        assert len(srv.messages("root")) == 1
        assert wait_for(lambda: "event=dsn" in srv.log())
        [line] = [x for x in srv.log().splitlines() if "event=dsn" in x]
        assert "to=someone@remote.mailgate.org" in line and "code=550" in line
    finally:
        srv.stop()


def _report(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    return raw.decode()


def test_notify_success_is_reported_delivered_or_expanded(tmp_path: Path) -> None:
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"

        [delivery]
        maildir_root = "{tmp_path}/maildir"
        local_users = ["alice", "bob", "carol"]

        [delivery.aliases]
        team = ["bob", "carol"]
    """)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            message = b"Subject: tell me\r\n\r\nhello\r\n"
            smtp.sendmail("alice@localhost", ["root@localhost"], message,
                          rcpt_options=["NOTIFY=SUCCESS"])
            smtp.sendmail("alice@localhost", ["team@localhost"], message,
                          rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
            smtp.sendmail("alice@localhost", ["root@localhost"], message,
                          rcpt_options=["NOTIFY=FAILURE"])  # no news is good news
            smtp.sendmail("", ["root@localhost"], message, rcpt_options=["NOTIFY=SUCCESS"])
        assert len(srv.messages("root")) == 3 and len(srv.messages("bob")) == 1
        delivered, expanded = sorted(
            (_report(raw) for raw in srv.messages("alice")), key=lambda r: "team@" in r
        )
        assert "Subject: Successful Mail Delivery Report" in delivered
        assert "Final-Recipient: rfc822; root@localhost" in delivered
        assert "Action: delivered" in delivered and "Status: 2.0.0" in delivered
        assert "Subject: tell me" in delivered  # the original header is quoted
        assert "Final-Recipient: rfc822; team@localhost" in expanded
        assert "Action: expanded" in expanded
    finally:
        srv.stop()


def test_a_downstream_with_dsn_reports_the_success_itself(tmp_path: Path) -> None:
    downstream = start_server(tmp_path / "b", f"""
        [server]
        spool_dir = "{tmp_path}/b/spool"

        [delivery]
        maildir_root = "{tmp_path}/b/maildir"
        local_domains = ["remote.mailgate.org"]
        system_users = false
        local_users = ["dana"]
    """, hostname="mx.remote.mailgate.org")
    front = start_server(tmp_path / "a", f"""
        [server]
        spool_dir = "{tmp_path}/a/spool"

        [delivery]
        maildir_root = "{tmp_path}/a/maildir"
        local_users = ["alice"]
        relay = "outbound"

        [delivery.destinations.outbound.smtp]
        host = "127.0.0.1"
        port = {downstream.port}
        starttls = "opportunistic"
    """, hostname="mx.front.mailgate.org")  # what it says in EHLO downstream
    try:
        with smtplib.SMTP(front.host, front.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.sendmail("alice@localhost", ["dana@remote.mailgate.org"],
                          b"Subject: far\r\n\r\nhello\r\n", rcpt_options=["NOTIFY=SUCCESS"])
        assert len(downstream.messages("dana")) == 1
        # The front handed NOTIFY on with the RCPT: the report is the downstream's,
        # which delivered the message (its report cannot reach alice@localhost there).
        assert wait_for(lambda: "event=dsn" in downstream.log())
        assert "delivered=dana@remote.mailgate.org" in downstream.log()
        assert "event=dsn" not in front.log() and front.messages("alice") == []
    finally:
        front.stop()
        downstream.stop()


class _HoldingRelay:
    """A relay that holds its answer to each message until released (at most 10 s)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.release = threading.Event()

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.events.append("report reached the relay")
        for _ in range(100):
            if self.release.is_set():
                break
            await asyncio.sleep(0.1)
        self.events.append("relay answered")
        return "250 2.0.0 queued"


def test_the_success_report_goes_out_after_the_250(tmp_path: Path) -> None:
    # The sender's report is handed to a relay that takes its time: the client's 250
    # must not wait for it (the message itself is stored).
    events: list[str] = []
    relay = _HoldingRelay(events)
    port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"

        [delivery]
        maildir_root = "{tmp_path}/maildir"
        relay = "outbound"

        [delivery.destinations.outbound.smtp]
        host = "127.0.0.1"
        port = {port}
        starttls = "off"
    """)
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=30) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.sendmail("alice@remote.mailgate.org", ["root@localhost"],
                          b"Subject: tell me\r\n\r\nhello\r\n", rcpt_options=["NOTIFY=SUCCESS"])
            events.append("client got its 250")
            assert wait_for(lambda: "report reached the relay" in events)
            relay.release.set()
        assert events.index("client got its 250") < events.index("relay answered")
        assert len(srv.messages("root")) == 1
        assert wait_for(lambda: "event=dsn" in srv.log())
        assert "delivered=root@localhost" in srv.log() and "code=250" in srv.log()
    finally:
        relay.release.set()
        srv.stop()
        controller.stop()
