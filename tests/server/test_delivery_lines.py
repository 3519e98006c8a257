"""The log lines of a session's messages: a recipient a next hop refused names that
next hop, as the line of one it took does; a message given up between BDAT chunks by
QUIT is abandoned, as by RSET, not a lost connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.replies import reply
from tests.server.conftest import Logged
from tests.server.harness import MESSAGE, context, session, turn


class _Refusing:
    """A delivery whose next hop refuses every recipient for good."""

    async def deliver(
        self, envelope: Envelope, trace: TraceInfo, spool: SpoolReader
    ) -> list[RecipientResult]:
        return [
            RecipientResult(
                rcpt, reply("delivery.downstream_rcpt_perm", address=str(rcpt.address)),
                remote_mta="mx.next.example", remote_reply="550 5.1.1 no such user here",
            )
            for rcpt in envelope.recipients
        ]


def test_a_refused_recipients_line_names_the_next_hop(tmp_path: Path, logged: Logged) -> None:
    ctx = context(tmp_path)
    ctx.delivery = _Refusing()  # type: ignore[assignment]

    async def go() -> str:
        s, transport = await session(ctx, [])
        await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n")
        await turn(s, transport, b"RCPT TO:<bob@mailgate.org>\r\n")
        await turn(s, transport, b"DATA\r\n")
        answer = await turn(s, transport, MESSAGE)
        await turn(s, transport, b"QUIT\r\n")
        return answer

    assert asyncio.run(go()).startswith("550 5.0.0 ")
    [line] = [fields for name, fields in logged if name == "delivery"]
    assert line["relay"] == "mx.next.example"
    assert line["code"] == 550 and "bob@mailgate.org" in str(line["reply"])


def test_quit_between_bdat_chunks_abandons_the_message(tmp_path: Path, logged: Logged) -> None:
    ctx = context(tmp_path)

    async def go() -> list[str]:
        s, transport = await session(ctx, [])
        await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n")
        await turn(s, transport, b"RCPT TO:<bob@mailgate.org>\r\n")
        before = len(transport.writes)
        s.data_received(b"BDAT 3\r\nabcQUIT\r\n")
        await asyncio.wait_for(s._task, 5)  # type: ignore[arg-type]
        return b"".join(transport.writes[before:]).decode().splitlines()

    # the chunk's 250 and the 221
    assert [line[:3] for line in asyncio.run(go())] == ["250", "221"]
    [message] = [fields for name, fields in logged if name == "message"]
    assert message["outcome"] == "abandoned" and "reason" not in message
