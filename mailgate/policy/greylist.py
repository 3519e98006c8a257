"""Greylisting (RFC 6647): defer the first attempt of an unknown triplet, accept its retry.

A triplet is (client network, sender, recipient): the network is the client's /24
(IPv4) or /64 (IPv6), because big senders retry from another host of the same pool;
sender and recipient are lowercased and the null sender ``<>`` is "".  Its states:

* unknown (or expired): record it as pending, defer with ``451 4.7.1`` ("new");
* pending for less than ``min_delay``: defer again ("early"); the first-seen time is
  kept, so a sender that retries often is not pushed back further;
* pending for ``min_delay`` up to ``pending_expiry``: accept, and remember the triplet
  as passed ("passed");
* passed within ``pass_expiry``: accept and renew the pass ("whitelisted").

Where: ``stage = "rcpt"`` greylists each recipient at its RCPT, so passed recipients
are accepted while the others are deferred.  ``stage = "data"`` answers once at DATA
for the whole transaction, because a DATA reply covers every recipient (RFC 5321
3.3).  Every recipient's triplet is checked and recorded, and the message passes when
**any** of them has passed or is whitelisted.  Greylisting only asks a client to
prove that it runs a queue that retries, and RFC 6647 section 5 aims to keep its cost
to such senders low: a client that has passed one triplet of this transaction has
proved it, and deferring it again would only delay the recipients that already
waited.  The upas ancestor did the same (spec section 8: "if any recipient was
recent").  The other recipients' triplets stay pending: they are not promoted, so
each still needs its own retry before it passes alone.

Skipped (tag "skipped"): trusted clients, authenticated clients (their mail is
submission, not an unknown MTA), and clients in the configured whitelist networks.

Fail open: when the store fails (Redis down, database unreadable) the step accepts
and tags the verdict ("greylist", "error").  Greylisting is a delay, not a filter:
refusing all mail because its bookkeeping is down would turn a Redis outage into a
mail outage, while accepting only lets through what the other policy steps accept.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Literal

from mailgate.config.policy import GreylistConfig
from mailgate.policy.base import ACCEPT, Client, IPAddress, Step, Verdict
from mailgate.policy.networks import NetworkList
from mailgate.policy.store import Store, StoreError, open_store
from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import reply

log = logging.getLogger(__name__)

Outcome = Literal["new", "early", "passed", "whitelisted"]


OUTAGE_RETRY = 10.0  # seconds between tries of a store that failed


def _plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_network(ip: IPAddress) -> str:
    """The network that stands for the client in a triplet: its /24 or /64."""
    ip = _plain(ip)
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store key of a triplet.

    Hashed so that the key has a fixed length whatever the addresses, and JSON-encoded
    first so that no choice of addresses can make two triplets share a key.
    """
    text = json.dumps([network, sender.lower(), recipient.lower()])
    return "greylist:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _address(envelope: Envelope) -> str:
    return "" if envelope.sender is None else str(envelope.sender)


class Greylist(Step):
    """The greylisting policy step; see the module docstring for the rules."""

    name = "greylist"

    def __init__(
        self,
        store: Store,
        config: GreylistConfig,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._config = config
        self._now = now
        # read as trusted_networks are: an IPv4-mapped entry is its IPv4 network (as
        # ip_network alone reads it, it matched no client, IPv4 or mapped)
        self._whitelist = NetworkList.parse(config.whitelist, "greylist.whitelist")
        self._store_failing = False  # so an outage is logged once, not per message
        # After a failure the store is left alone until then (self._now): each check
        # would otherwise wait out its timeout first, a delay per RCPT of every session.
        self._retry_at = 0.0

    async def check(self, ip: IPAddress, sender: str, recipient: str) -> Outcome:
        """Look up one triplet, record this attempt, and say what it is now.

        Raises :class:`StoreError` when the store fails.  The timestamps stored in the
        value decide, not only the store's TTL, so the rules hold with any backend.
        """
        cfg = self._config
        key = triplet_key(client_network(ip), sender, recipient)
        now = self._now()
        state, since = _parse(await self._store.get(key))
        age = now - since
        if state == "passed" and age < cfg.pass_expiry:
            await self._store.set(key, f"passed {now!r}", ttl=cfg.pass_expiry)
            return "whitelisted"
        if state == "pending" and age < cfg.pending_expiry:
            if age < cfg.min_delay:
                return "early"
            await self._store.set(key, f"passed {now!r}", ttl=cfg.pass_expiry)
            return "passed"
        await self._store.set(key, f"pending {now!r}", ttl=cfg.pending_expiry)
        return "new"

    def _skips(self, client: Client) -> bool:
        if client.trusted or client.auth_user:
            return True
        return client.ip in self._whitelist

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict:
        if self._config.stage != "rcpt":
            return ACCEPT
        return await self._decide(client, _address(envelope), [str(recipient.address)])

    async def data(self, client: Client, envelope: Envelope) -> Verdict:
        if self._config.stage != "data" or not envelope.recipients:
            return ACCEPT
        recipients = [str(r.address) for r in envelope.recipients]
        return await self._decide(client, _address(envelope), recipients)

    async def _decide(self, client: Client, sender: str, recipients: list[str]) -> Verdict:
        if self._skips(client):
            return _verdict("skipped")
        # (the check on the far side holds if the clock was set back meanwhile)
        if self._store_failing and 0 < self._retry_at - self._now() <= OUTAGE_RETRY:
            return _verdict("error")  # failing open at once during an outage
        outcomes: list[Outcome] = []
        failed = False
        # One at a time: a DATA with 100 recipients should not open 100 Redis
        # connections, and the first store failure ends the loop instead of waiting
        # out a timeout per recipient.
        for recipient in dict.fromkeys(r.lower() for r in recipients):
            try:
                outcomes.append(await self.check(client.ip, sender, recipient))
            except Exception as err:  # a policy step must never raise
                self._note_failure(err)
                failed = True
                break
        if not failed:
            self._note_recovery()
        if "whitelisted" in outcomes:
            return _verdict("whitelisted")
        if "passed" in outcomes:
            return _verdict("passed")
        if failed:
            return _verdict("error")
        # "early" when the client did retry, only too soon; "new" for a first attempt.
        return _deferred("early" if "early" in outcomes else "new")

    def _note_failure(self, err: BaseException) -> None:
        if not isinstance(err, StoreError):
            # A bug rather than an outage: show it every time, but still fail open,
            # because a policy step must never raise into the session.
            log.error("greylist check failed", exc_info=err)
        else:
            self._retry_at = self._now() + OUTAGE_RETRY
            if not self._store_failing:
                self._store_failing = True
                log.warning("greylist store failed, accepting without greylisting "
                            "(tried again every %g s): %s", OUTAGE_RETRY, err)

    def _note_recovery(self) -> None:
        if self._store_failing:
            self._store_failing = False
            log.info("greylist store works again")

    async def close(self) -> None:
        """Close the store (the engine calls this at shutdown)."""
        try:
            await self._store.close()
        except StoreError as err:
            log.warning("closing the greylist store: %s", err)


def _parse(value: str | None) -> tuple[str, float]:
    """A stored value as (state, since); anything unreadable counts as unknown."""
    if value is None:
        return "", 0.0
    state, _, since = value.partition(" ")
    try:
        return state, float(since)
    except ValueError:
        return "", 0.0


def _verdict(outcome: str) -> Verdict:
    return Verdict(tags=(("greylist", outcome),))


def _deferred(outcome: str) -> Verdict:
    return Verdict(reply=reply("greylist.deferred"), tags=(("greylist", outcome),))


def build_greylist(config: GreylistConfig, now: Callable[[], float] = time.time) -> Greylist:
    """The greylisting step with the store the config names.

    Raises :class:`~mailgate.policy.store.StoreError` when the SQLite file cannot be
    opened or the Redis URL is malformed, so such a mistake stops start-up.  Redis
    itself is not contacted here: it may come up later, and until it does the step
    fails open.
    """
    store = open_store(
        config.backend, config.sqlite_path, config.redis_url, config.redis_timeout, now=now
    )
    return Greylist(store, config, now=now)


__all__ = ["Greylist", "Outcome", "build_greylist", "client_network", "triplet_key"]
