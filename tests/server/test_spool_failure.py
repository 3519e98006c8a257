"""A message whose spool fails (a full disk, an I/O error) is answered 4xx after its
data, logged with its id like every other message, and not held against the client."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from mailgate.delivery.spool import SpoolFile
from tests.server.harness import MESSAGE, context, session, turn

BODY = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"


def _failing_body(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """The spool takes the Received: field, then fails on the body."""
    real = SpoolFile.write

    def write(self: SpoolFile, data: bytes) -> None:
        if not data.startswith(b"Received:"):
            raise OSError(err, "failed")
        real(self, data)

    monkeypatch.setattr(SpoolFile, "write", write)


@pytest.mark.parametrize(
    ("err", "answer"), [(errno.ENOSPC, "452 4.3.1 "), (errno.EIO, "451 4.3.0 ")]
)
def test_a_spool_failing_in_the_data_is_answered_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    logged: list[tuple[str, dict[str, object]]], err: int, answer: str,
) -> None:
    _failing_body(monkeypatch, err)
    # max_errors = 1: were the failure counted, the next command would get 421
    ctx = context(tmp_path, "max_errors = 1")

    async def go() -> list[str]:
        s, transport = await session(ctx, [])
        replies = [
            await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n"),
            await turn(s, transport, b"RCPT TO:<bob@mailgate.org>\r\n"),
            await turn(s, transport, b"DATA\r\n"),
            await turn(s, transport, BODY + b".\r\n"),
            await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n"),
        ]
        await turn(s, transport, b"QUIT\r\n")
        return replies

    replies = asyncio.run(go())
    assert [r[:3] for r in replies] == ["250", "250", "354", answer[:3], "250"]
    assert replies[3].startswith(answer)
    spool = [fields for name, fields in logged if name == "spool"]
    message = [fields for name, fields in logged if name == "message"]
    assert len(spool) == 1 and len(message) == 1
    # both name the message, so an operator can tie the error to the client's 4xx
    assert spool[0]["id"] == message[0]["id"]
    assert message[0]["code"] == int(answer[:3])
    assert message[0]["enhanced"] == answer[4:9]
    assert message[0]["reason"] == "spool"
    assert message[0]["rcpts"] == 1


def test_the_next_message_after_a_spool_failure_is_stored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    logged: list[tuple[str, dict[str, object]]],
) -> None:
    failures = iter([True])
    real = SpoolFile.write

    def write(self: SpoolFile, data: bytes) -> None:
        if not data.startswith(b"Received:") and next(failures, False):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(SpoolFile, "write", write)
    ctx = context(tmp_path)

    async def go() -> list[str]:
        s, transport = await session(ctx, [])
        answers = []
        for _ in range(2):
            await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n")
            await turn(s, transport, b"RCPT TO:<bob@mailgate.org>\r\n")
            await turn(s, transport, b"DATA\r\n")
            answers.append(await turn(s, transport, MESSAGE))
        await turn(s, transport, b"QUIT\r\n")
        return answers

    first, second = asyncio.run(go())
    assert first.startswith("452 4.3.1 ")
    assert second.startswith("250 2.0.0 ")
    codes = [fields["code"] for name, fields in logged if name == "message"]
    assert codes == [452, 250]
