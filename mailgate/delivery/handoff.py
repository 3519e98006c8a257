"""Hand-offs of one message agree before any of them sends the data.

mailgate keeps no queue: the client gets one reply for the whole message, and a 4xx
makes it send all of it again.  So when a message goes to several next hops at once
(an LMTP server for the local users, a smarthost for the others, a mailer) and one of
them defers a recipient at RCPT, the others must not take the data now: their
recipients would get a second copy with every retry.  Each hand-off therefore stops
at its point of no return (its RCPTs answered, its data not yet sent) and says
whether it deferred anyone; once every hand-off of the message has said so, they all
go on, or all hold back.  A next hop that defers only after the data can still cause
a second copy elsewhere: a duplicate is better than a loss.

The router gives each hand-off its :class:`Party` through a context variable (each
runs in a task of its own, with its own copy of the context), so destinations keep
their interface; alone, a destination's :func:`may_send_data` answers at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from mailgate.delivery.base import RecipientResult

_party: ContextVar[Party | None] = ContextVar("mailgate_handoff_party", default=None)


class Agreement:
    """The hand-offs of one message: ``parties`` of them must each say once."""

    def __init__(self, parties: int) -> None:
        self._waiting_for = parties
        self._deferred = False
        self._all_said = asyncio.Event()

    def _say(self, deferred: bool) -> None:
        self._deferred = self._deferred or deferred
        self._waiting_for -= 1
        if self._waiting_for <= 0:
            self._all_said.set()

    async def _outcome(self) -> bool:
        await self._all_said.wait()
        return not self._deferred

    async def run(
        self, deliver: Callable[[], Awaitable[list[RecipientResult]]]
    ) -> list[RecipientResult]:
        """Run one hand-off as a party.  One that never asks (a site's own destination,
        or one that failed before its point of no return) has its say when it is done,
        by its results: the others wait for it, never for ever."""
        party = Party(self)
        _party.set(party)  # (this task's own context: the caller runs it as a task)
        results: list[RecipientResult] = []
        try:
            results = await deliver()
        finally:
            party.say(any(not r.ok and r.reply.code < 500 for r in results) or not results)
        return results


class Party:
    """One hand-off's voice in an :class:`Agreement`: it says once."""

    __slots__ = ("_agreement", "_said")

    def __init__(self, agreement: Agreement) -> None:
        self._agreement = agreement
        self._said = False

    def say(self, deferred: bool) -> None:
        if not self._said:
            self._said = True
            self._agreement._say(deferred)

    async def agree(self, deferred: bool) -> bool:
        self.say(deferred)
        return await self._agreement._outcome()


async def may_send_data(deferred: bool) -> bool:
    """At a hand-off's point of no return: whether to send the data now.  ``deferred``:
    this hand-off refused a recipient for now.  False when it did or another hand-off
    of the message did (after waiting for every one of them to say): the accepted
    recipients are then held back, to come again whole with the client's retry."""
    party = _party.get()
    if party is None:
        return not deferred
    return await party.agree(deferred)
