"""One reply after the data from per-recipient results, and what a report's fate does
to it when some recipients have the message and others were refused for good."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailgate.delivery.base import RecipientResult
from mailgate.protocol.envelope import NULL_ADDRESS, Address, Envelope, Recipient
from mailgate.protocol.replies import reply
from mailgate.server.context import Report
from mailgate.server.outcome import combine_results
from tests.server.harness import context

ROOT = Recipient(Address("root", "localhost"))
LISTS = Recipient(Address("lists", "localhost"))
ENVELOPE = Envelope(sender=Address("alice", "example.org"), recipients=[ROOT, LISTS])


class _Server:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.asked: list[list[RecipientResult]] = []

    async def bounce(self, session: object, envelope: Envelope,
                     failed: list[RecipientResult], spool_path: str) -> Report:
        self.asked.append(failed)
        return self.report


class _Session:
    message_id = "S1.1"

    def __init__(self, report: Report) -> None:
        self.server = _Server(report)


class _Spool:
    path = "/nonexistent/spool"


def _combine(report: Report, results: list[RecipientResult]) -> str:
    session = _Session(report)
    final = asyncio.run(combine_results(session, ENVELOPE, results, _Spool()))  # type: ignore[arg-type]
    return str(final)


def test_all_durable_is_250_and_nobody_is_told() -> None:
    ok = [RecipientResult(ROOT, reply("ok")), RecipientResult(LISTS, reply("ok"))]
    assert _combine(Report.IMPOSSIBLE, ok) == "250 2.0.0 OK: queued as S1.1"


def test_a_temporary_failure_defers_the_whole_message() -> None:
    results = [RecipientResult(ROOT, reply("ok")),
               RecipientResult(LISTS, reply("delivery.storage"))]
    assert _combine(Report.SENT, results).startswith("452 4.3.1 ")


MIXED = [
    RecipientResult(ROOT, reply("ok")),
    RecipientResult(LISTS, reply("delivery.mailer_refused")),
]


@pytest.mark.parametrize(
    ("report", "first_line"),
    [
        (Report.SENT, "250 2.0.0 OK: queued as S1.1"),  # the sender has the bounce
        (Report.DEFER, "451 4.3.0 Not every recipient could take it, and the report of that "
         "cannot be sent now; try again later"),
        # no retry could report it: refuse, naming who did not get it
        (Report.IMPOSSIBLE, "554-5.0.0 <lists@localhost>: 554 5.6.0 "),
    ],
)
def test_mixed_results_follow_the_report(report: Report, first_line: str) -> None:
    said = _combine(report, MIXED)
    assert said.startswith(first_line)
    if report is Report.IMPOSSIBLE:
        assert said.splitlines()[-1] == (
            "554 5.0.0 Not delivered to the recipients above; the others have it, and no "
            "report could reach the sender"
        )


def test_a_deferral_is_answered_with_its_cause_not_with_a_recipient_held_back() -> None:
    # The mailbox (first) was held back because the relay (second) deferred: the
    # client is told why the message must come again, not what that did to the other.
    results = [RecipientResult(ROOT, reply("delivery.held_back")),
               RecipientResult(LISTS, reply("delivery.downstream_rcpt_temp", address="x@y"))]
    assert _combine(Report.SENT, results).startswith("451 4.4.0 Downstream deferred <x@y>")


def test_a_null_sender_whose_failed_recipients_asked_never_gets_250(tmp_path: Path) -> None:
    # Nothing is to be reported (NOTIFY=NEVER), so that the null sender cannot be
    # reported to does not matter: the others have the message, and 250 says so.
    ctx = context(tmp_path)
    never = Recipient(Address("lists", "mailgate.org"), notify=("NEVER",))
    bounce = Envelope(sender=NULL_ADDRESS, recipients=[ROOT, never])
    failed = [RecipientResult(never, reply("delivery.mailer_refused"))]
    report = asyncio.run(ctx.bounce(None, bounce, failed, "/nonexistent"))  # type: ignore[arg-type]
    assert report is Report.SENT
    asked = [RecipientResult(LISTS, reply("delivery.mailer_refused"))]
    assert asyncio.run(ctx.bounce(None, bounce, asked, "/nonexistent")) is (  # type: ignore[arg-type]
        Report.IMPOSSIBLE
    )
