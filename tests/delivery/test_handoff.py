"""The hand-offs of one message agree before any sends its data: when one defers a
recipient at RCPT, none sends (the client retries the whole message)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from mailgate.config.delivery import PipeConfig
from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.handoff import Agreement, may_send_data
from mailgate.delivery.pipe import PipeDestination
from mailgate.delivery.router import Router, RoutingTable
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import reply
from tests.delivery.test_pipe import RECORDER, Spooled, runs, script

TRACE = TraceInfo("id7", "client.test", "192.0.2.1", None, "mx.test", "ESMTP")
RCPT = Recipient(Address("bob", "example.org"))


class _Asking:
    """A hand-off that asks at its point of no return, as LMTP and SMTP do."""

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        self.sent: bool | None = None

    async def deliver(self) -> list[RecipientResult]:
        self.sent = await may_send_data(self.deferred)
        if self.deferred:
            return [RecipientResult(RCPT, reply("delivery.downstream_rcpt_temp", address="x"))]
        return [RecipientResult(RCPT, reply("ok" if self.sent else "delivery.held_back"))]


async def _together(*deliveries: object) -> list[list[RecipientResult]]:
    agreement = Agreement(len(deliveries))
    return await asyncio.gather(*(agreement.run(d) for d in deliveries))  # type: ignore[arg-type]


def test_hand_offs_send_only_when_none_deferred() -> None:
    a, b = _Asking(False), _Asking(False)
    asyncio.run(_together(a.deliver, b.deliver))
    assert (a.sent, b.sent) == (True, True)
    a, b = _Asking(False), _Asking(True)
    asyncio.run(_together(a.deliver, b.deliver))
    assert (a.sent, b.sent) == (False, False)


def test_a_hand_off_that_never_asks_has_its_say_by_its_results() -> None:
    async def deferring() -> list[RecipientResult]:
        await asyncio.sleep(0.01)  # the asking one waits for it
        return [RecipientResult(RCPT, reply("delivery.smarthost_temp"))]

    async def refusing() -> list[RecipientResult]:  # for good: the others still go on
        return [RecipientResult(RCPT, reply("delivery.downstream_perm"))]

    async def failing() -> list[RecipientResult]:
        raise RuntimeError("a bug")

    for other, expected in ((deferring, False), (refusing, True)):
        asking = _Asking(False)
        asyncio.run(_together(asking.deliver, other))
        assert asking.sent is expected
    asking = _Asking(False)
    with pytest.raises(RuntimeError):
        asyncio.run(_together(asking.deliver, failing))
    assert asking.sent is False


def test_alone_a_hand_off_decides_for_itself() -> None:
    assert asyncio.run(may_send_data(False)) is True
    assert asyncio.run(may_send_data(True)) is False


class _DeferringRelay:
    """A relay that defers its one recipient at RCPT."""

    async def deliver(
        self, envelope: Envelope, trace: TraceInfo, spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        await may_send_data(True)
        return [RecipientResult(r, reply("delivery.smarthost_temp")) for r in recipients]


def test_a_mailer_does_not_run_while_a_relay_of_the_message_defers(tmp_path: Path) -> None:
    out = tmp_path / "runs.jsonl"
    mailer = script(tmp_path, RECORDER, out)
    table = RoutingTable(
        postmaster_domain="example.org",
        local_domains={"example.org": "example.org"},
        default="mailer",
        local_users=frozenset({"bob"}),
        relay="relay",
    )
    router = Router(table, {
        "mailer": PipeDestination(PipeConfig(command=[sys.executable, mailer, "{recipient}"])),
        "relay": _DeferringRelay(),
    })
    spool = tmp_path / "msg.spool"
    spool.write_bytes(b"Subject: t\r\n\r\nbody\r\n")
    rcpts = [Recipient(Address("bob", "example.org")), Recipient(Address("x", "remote.test"))]
    envelope = Envelope(sender=Address("s", "client.test"), recipients=rcpts)
    results = asyncio.run(router.deliver(envelope, TRACE, Spooled(str(spool), 20)))  # type: ignore[arg-type]
    assert [r.reply.name for r in results] == ["delivery.held_back", "delivery.smarthost_temp"]
    assert runs(out) == []  # the mailer never ran: the retry will be its only copy
