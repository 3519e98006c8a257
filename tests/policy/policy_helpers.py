"""Small builders shared by the policy tests (imported as ``policy_helpers``)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Coroutine
from typing import Any, TypeVar

from mailgate.policy.base import Client
from mailgate.protocol.envelope import Address, Envelope, Recipient

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion (the tests are plain functions)."""
    return asyncio.run(coro)


def client(ip: str = "203.0.113.5", local_ip: str | None = "192.0.2.250", **kw: Any) -> Client:
    return Client(
        ip=ipaddress.ip_address(ip),
        local_ip=ipaddress.ip_address(local_ip) if local_ip else None,
        **kw,
    )


def address(text: str, quoted: bool = False) -> Address:
    """ "user@domain" split at the last @ (the envelope's own parser is not ours to use)."""
    if text == "":
        return Address("", "")
    local, at, domain = text.rpartition("@")
    if not at:
        return Address(text, "", quoted)
    return Address(local, domain, quoted)


def envelope(sender: str | None = "alice@a.sender.lab", helo: str = "mail.client.lab") -> Envelope:
    return Envelope(helo=helo, sender=None if sender is None else address(sender))


def recipient(text: str, quoted: bool = False) -> Recipient:
    return Recipient(address(text, quoted))


class Mailboxes:
    """A table of local domains and users: the Mailboxes interface the router implements."""

    def __init__(self, domains: set[str], users: set[str], postmaster_domain: str = "") -> None:
        self.domains = domains
        self.users = users  # "local@domain", lower case
        # whose postmaster a bare <Postmaster> is (the router: the host name's domain
        # when local, else the first local domain)
        self.postmaster_domain = postmaster_domain or min(domains, key=len, default="")

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def has_recipient(self, local: str, domain: str) -> bool:
        return f"{local.lower()}@{(domain or self.postmaster_domain).lower()}" in self.users
