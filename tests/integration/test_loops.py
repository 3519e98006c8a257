"""End to end: a looping message is refused after the data and nothing is stored."""

from __future__ import annotations

import smtplib

import pytest

from tests.integration.server import RunningServer


def _message(hops: int) -> bytes:
    fields = b"".join(
        f"Received: from relay{n}.mailgate.org by relay{n + 1}.mailgate.org;"
        f" Wed, 25 Nov 2026 12:00:{n % 60:02d} +0000\r\n".encode()
        for n in range(hops)
    )
    return fields + b"Subject: round and round\r\n\r\nhello\r\n"


def test_a_message_over_the_hop_limit_is_554_5_4_6(server: RunningServer) -> None:
    # 99 fields plus ours is the default limit of 100: still accepted.
    with smtplib.SMTP(server.host, server.port, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"], _message(99))
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("a@client.mailgate.org", ["root@localhost"], _message(100))
        assert refused.value.smtp_code == 554
        assert refused.value.smtp_error.startswith(b"5.4.6 Too many hops (101 Received:")
        assert smtp.noop()[0] == 250  # the session goes on
    assert len(server.messages("root")) == 1
    assert "reason=loop" in server.log() and "received=101" in server.log()
