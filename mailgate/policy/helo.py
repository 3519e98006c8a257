"""HELO/EHLO name checks: the upas "Liar" rules, answered as RFC 5321 allows.

upas hung up with ``554 5.7.0 Liar!``; RFC 5321 lists 550 for a refused HELO and
requires 421 before closing, so a refusal is ``550 5.7.1`` with the session going on
(``helo_refusal = "reply"``) or ``421 4.7.1`` and close (``"hangup"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

from mailgate.config.names import parse_literal
from mailgate.policy.base import ACCEPT, Client, Step, Verdict
from mailgate.policy.networks import is_trusted, unmap
from mailgate.protocol.idn import domain_key
from mailgate.protocol.replies import reply

# RFC 2606 section 2 and RFC 6761 section 6: reserved top-level names and second-level
# example domains, which no real host on the internet can be called.
RESERVED_TLDS: Final = frozenset({"localhost", "localdomain", "example", "invalid", "test"})
RESERVED_DOMAINS: Final = frozenset({"example.com", "example.net", "example.org"})


class HeloStep(Step):
    """Refuses HELO/EHLO names that lie about the client or cannot name a real host."""

    name = "helo"

    def __init__(
        self,
        hostname: str,
        local_names: Iterable[str] = (),
        refusal: Literal["reply", "hangup"] = "reply",
        literal_must_match: bool = False,
    ) -> None:
        self._hostname = hostname
        names = [n for n in (hostname, *local_names) if n]
        # compared by domain_key: our name in A-labels is our name too
        self._ours = frozenset(domain_key(n.rstrip(".")) for n in names if not n.startswith("["))
        # our addresses named as literals in local_names ("[192.0.2.1]")
        self._our_addresses = frozenset(
            unmap(address) for n in names if (address := parse_literal(n)) is not None
        )
        self._hangup = refusal == "hangup"
        self._literal_must_match = literal_must_match

    async def helo(self, client: Client, name: str) -> Verdict:
        if client.listener != "public":
            # Submission (587, 465): mail programs name their machine as they please
            # (DESKTOP-ABC123, localhost), and the client must authenticate anyway
            # (RFC 6409 4.3); these checks are for MTAs on port 25.
            return ACCEPT
        problem = self.problem(client, name)
        if problem is None:
            return ACCEPT
        tag, reason = problem
        tags = (("check", self.name), ("reason", tag))
        if self._hangup:
            refusal = reply("closing.helo_refused", host=self._hostname, name=name, reason=reason)
            return Verdict(refusal, close=True, tags=tags)
        return Verdict(reply("helo.refused", name=name, reason=reason), tags=tags)

    def problem(self, client: Client, name: str) -> tuple[str, str] | None:
        """(log tag, reason for the reply) of what is wrong with ``name``, or None."""
        lower = name.strip().lower()
        if lower.endswith("."):  # the absolute form of a name is the same name
            lower = lower[:-1]
        if not lower:
            return "empty", "empty name"
        if lower.startswith("["):
            return self._literal_problem(client, lower)
        # This machine talking to itself may use our name, or say localhost (msmtp's
        # default, and what a host without a domain name calls itself): from it, that
        # is no lie.  Only while it is trusted: behind a local proxy every client
        # comes from 127.0.0.1, and a site that runs one takes loopback out of
        # trusted_networks.
        itself = _is_local_client(client) and is_trusted(client)
        if domain_key(lower) in self._ours and not itself:
            return "impersonation", "that is my name"
        labels = lower.split(".")
        reserved = labels[-1] in RESERVED_TLDS or ".".join(labels[-2:]) in RESERVED_DOMAINS
        if reserved and not itself:
            return "rfc2606", "reserved name (RFC 2606)"
        # Trusted clients (a host on our own network) may use a short or numeric name.
        if is_trusted(client):
            return None
        if len(labels) < 2:
            return "nodot", "no dot in name"
        if not any(ch.isalpha() for ch in lower):
            return "noletter", "no letter in name; use an address literal [a.b.c.d]"
        return None

    def _literal_problem(self, client: Client, lower: str) -> tuple[str, str] | None:
        address = parse_literal(lower)
        if address is None:
            return "literal", "bad address literal"
        # Our own address (the one the client connected to, or one local_names lists)
        # claimed by a stranger is the same lie as our name; a client naming its own
        # address tells the truth (this machine talking to itself, say).
        claimed = unmap(address)
        ours = claimed in self._our_addresses or (
            client.local_ip is not None and claimed == unmap(client.local_ip)
        )
        if ours and claimed != unmap(client.ip):
            return "impersonation", "that is my address"
        if self._literal_must_match and unmap(address) != unmap(client.ip):
            return "literal_mismatch", "address literal is not your address"
        return None


def _is_local_client(client: Client) -> bool:
    """The client is this machine (talking to itself), so it may use our name."""
    return client.local_ip is not None and unmap(client.ip) == unmap(client.local_ip)
