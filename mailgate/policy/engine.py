"""The policy engine: runs the policy steps in order at each stage of a session.

The first verdict that is not an accept is the answer.  The engine never raises: a step
that fails unexpectedly is logged with its traceback and answered with the temporary
``451 4.3.0`` "filter.internal", so a bug costs a retry, never a lost or wrongly
refused message.  It also owns the session facts every step relies on: whether the
client is trusted, and the upas filter state of the current transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mailgate.policy.base import ACCEPT, Client, Spooled, Step, Verdict
from mailgate.policy.networks import NetworkList, is_trusted
from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import reply

log = logging.getLogger("mailgate.policy")

StageMethod = Callable[..., Awaitable[Verdict]]  # a step's method for one stage


class PolicyEngine:
    """A :class:`mailgate.policy.base.Policy` made of :class:`Step` objects."""

    def __init__(self, steps: Sequence[Step], trusted_networks: NetworkList) -> None:
        self.steps = tuple(steps)
        self._trusted = trusted_networks
        # Per stage, the bound methods of only the steps that do something there: a Step
        # subclass that does not override a stage would just accept, and this runs for
        # every command.
        self._calls: dict[str, tuple[tuple[Step, StageMethod], ...]] = {
            stage: tuple(
                (step, getattr(step, stage)) for step in self.steps if _acts_at(step, stage)
            )
            for stage in _STAGES
        }

    async def connect(self, client: Client) -> Verdict:
        try:
            client.trusted = client.trusted or (client.address_known and client.ip in self._trusted)
        except Exception:  # an address object of some unexpected kind: not trusted
            log.exception("policy: cannot classify client address %r", client.ip)
        client.filter_state = "TRUSTED" if client.trusted else "ACCEPT"
        return await self._run("connect", client, (client,))

    async def helo(self, client: Client, name: str) -> Verdict:
        return await self._run("helo", client, (client, name))

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        # A new transaction: its filter state starts afresh (AUTH may have come since).
        client.filter_state = "TRUSTED" if is_trusted(client) else "ACCEPT"
        return await self._run("mail", client, (client, envelope))

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict:
        return await self._run("rcpt", client, (client, envelope, recipient))

    async def data(self, client: Client, envelope: Envelope) -> Verdict:
        return await self._run("data", client, (client, envelope))

    async def message(self, client: Client, envelope: Envelope, body: Spooled) -> Verdict:
        return await self._run("message", client, (client, envelope, body))

    async def close(self) -> None:
        """Release what the steps hold (the greylist's SQLite or Redis store)."""
        for step in self.steps:
            close = getattr(step, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception as exc:  # closing must not stop the others
                    log.warning("closing %s failed: %s", getattr(step, "name", step), exc)

    async def _run(self, stage: str, client: Client, args: tuple[Any, ...]) -> Verdict:
        # Accepting steps may tag too (greylist "passed"); their tags reach the log
        # along with those of the refusal, if any.
        tags: tuple[tuple[str, str], ...] = ()
        for step, method in self._calls[stage]:
            try:
                verdict = await method(*args)
            except Exception:
                log.exception(
                    "policy step %s failed at %s session=%s", step.name, stage, client.session_id
                )
                internal = (("check", step.name), ("reason", "internal"))
                return Verdict(reply("filter.internal"), tags=tags + internal)
            if not verdict.accepted:
                return Verdict(verdict.reply, verdict.close, tags + verdict.tags)
            tags += verdict.tags
        return Verdict(tags=tags) if tags else ACCEPT


_STAGES = ("connect", "helo", "mail", "rcpt", "data", "message")


def _acts_at(step: Step, stage: str) -> bool:
    """False only for a Step subclass that inherits the accept-all method of ``stage``."""
    return getattr(type(step), stage, None) is not getattr(Step, stage)
