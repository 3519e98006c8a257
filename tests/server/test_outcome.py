"""One reply after the data from per-recipient results, and what a report's fate does
to it when some recipients have the message and others were refused for good."""

from __future__ import annotations

import asyncio

import pytest

from mailgate.delivery.base import RecipientResult
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import reply
from mailgate.server.context import Report
from mailgate.server.outcome import combine_results

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
