"""Access lists in the spirit of upas ``/mail/lib/blocked`` and ratfs.

The file format is documented in docs/access-lists.md: one rule a line,
``<action> <kind> <pattern>  # comment``.  The resulting upas filter state follows
ratfs: ``allow`` beats every other rule whatever the order of the file, then ``block``,
``deny``, ``dialup`` and ``delay`` in that order.

When each rule takes effect:

* IP rules are matched at connect; HELO, IP and sender rules together give the filter
  state at MAIL, where DENIED, DIALUP and DELAY are refused (as upas since 2009);
* BLOCKED is accepted up to the end of the data and refused then (the message is
  discarded or quarantined, per ``blocked_disposition``), so a spammer learns little;
* recipient rules apply at RCPT; a blocked recipient is a spam trap that makes the
  whole message BLOCKED; a message is delivered anyway when every recipient has an
  ``allow recipient`` rule (the upas ``nospamfiltering`` opt-out).

The IP rule matched at connect is kept in ``client.tags`` (``access_ip`` and
``access_ip_rule``, its file:line) so the session log shows it; ``access_rule`` names
the rule that decided the transaction, and ``client.tags["access"] = "allow"`` tells
later steps (DNSBL) that an allow rule matched it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from mailgate.policy.base import ACCEPT, Client, IPAddress, Spooled, Step, Verdict
from mailgate.policy.networks import Network, is_trusted, parse_network, unmap
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.idn import domain_key
from mailgate.protocol.replies import reply

# In precedence order: the first action with a matching rule wins (ratfs order).
ACTIONS: Final = ("allow", "block", "deny", "dialup", "delay")
KINDS: Final = ("ip", "helo", "sender", "recipient")
FILTER_STATE: Final = {
    "allow": "ACCEPT",
    "block": "BLOCKED",
    "deny": "DENIED",
    "dialup": "DIALUP",
    "delay": "DELAY",
}
_COMMENT = re.compile(r"(?:^|\s)#.*$")


@dataclass(frozen=True, slots=True)
class NamePattern:
    """A host name, or ``*.domain``: the domain and every name under it."""

    name: str
    subdomains: bool

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        lower = domain_key(text.rstrip("."))
        wild = lower.startswith("*.")
        name = lower[2:] if wild else lower
        if not name or "*" in name:
            raise ValueError(f"bad name pattern {text!r}: use name or *.domain")
        return cls(name, wild)

    def matches(self, name: str) -> bool:
        name = domain_key(name.rstrip("."))
        return name == self.name or (self.subdomains and name.endswith("." + self.name))


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """``user@domain``; ``*`` or ``prefix*`` for the user, ``*`` or ``*.domain`` for the
    domain; a bare ``domain`` means ``*@domain``; ``<>`` is the null sender."""

    local: str
    prefix: bool  # local is a prefix ("info*"), or "" for any user
    domain: NamePattern | None  # None: any domain
    null: bool = False

    @classmethod
    def parse(cls, text: str) -> AddressPattern:
        if text == "<>":
            return cls("", False, None, null=True)
        lower = text.lower()
        local, at, domain = lower.rpartition("@")
        if not at:
            local = "*"
        prefix = local.endswith("*")
        local = local.removesuffix("*")
        if "*" in local or (not local and not prefix):
            raise ValueError(f"bad user in {text!r}: use user, prefix* or *")
        pattern = None if domain == "*" else NamePattern.parse(domain)
        if pattern is None and not local:
            raise ValueError(f"pattern {text!r} would match every address")
        return cls(local, prefix, pattern)

    def matches(self, address: Address) -> bool:
        if self.null or address.is_null:
            return self.null and address.is_null
        local = address.local.lower()
        if not (local.startswith(self.local) if self.prefix else local == self.local):
            return False
        return self.domain is None or self.domain.matches(address.domain)


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    kind: str
    text: str  # the pattern as written
    where: str  # "file:line", for the log

    @property
    def state(self) -> str:
        return FILTER_STATE[self.action]


class AccessList:
    """The parsed rules; ``match_*`` return the winning rule (by action precedence) or None."""

    def __init__(self) -> None:
        self._ip: list[tuple[Rule, Network]] = []
        self._helo: list[tuple[Rule, NamePattern]] = []
        self._addresses: dict[str, list[tuple[Rule, AddressPattern]]] = {
            "sender": [],
            "recipient": [],
        }

    @classmethod
    def parse(cls, text: str, source: str) -> AccessList:
        """Parse a whole file; a bad line raises ValueError("<source>:<line>: <problem>")."""
        rules = cls()
        for number, line in enumerate(text.splitlines(), 1):
            tokens = _COMMENT.sub("", line).split()
            if not tokens:
                continue
            try:
                rules._add(tokens, f"{source}:{number}")
            except ValueError as exc:
                raise ValueError(f"{source}:{number}: {exc}") from None
        # A stable sort keeps file order inside one action; the first match then wins.
        for table in (rules._ip, rules._helo, *rules._addresses.values()):
            table.sort(key=lambda entry: ACTIONS.index(entry[0].action))
        return rules

    @classmethod
    def load(cls, path: str) -> AccessList:
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.parse(text, path)

    def match_ip(self, ip: IPAddress) -> Rule | None:
        ip = unmap(ip)
        return next((rule for rule, network in self._ip if ip in network), None)

    def match_helo(self, name: str) -> Rule | None:
        return next((rule for rule, pattern in self._helo if pattern.matches(name)), None)

    def match_address(self, kind: Literal["sender", "recipient"], address: Address) -> Rule | None:
        table = self._addresses[kind]
        return next((rule for rule, pattern in table if pattern.matches(address)), None)

    def _add(self, tokens: list[str], where: str) -> None:
        if len(tokens) != 3:
            raise ValueError("expected <action> <kind> <pattern>")
        action, kind, text = tokens[0].lower(), tokens[1].lower(), tokens[2]
        if action not in ACTIONS:
            raise ValueError(f"unknown action {tokens[0]!r}; one of {', '.join(ACTIONS)}")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {tokens[1]!r}; one of {', '.join(KINDS)}")
        rule = Rule(action, kind, text, where)
        if kind == "ip":
            self._ip.append((rule, parse_network(text)))
        elif kind == "helo":
            self._helo.append((rule, NamePattern.parse(text)))
        elif action == "dialup":
            raise ValueError("dialup describes a client: use it with ip or helo")
        else:
            pattern = AddressPattern.parse(text)
            if pattern.null and kind == "recipient":
                raise ValueError("<> is a sender, never a recipient")
            self._addresses[kind].append((rule, pattern))


class AccessStep(Step):
    """Applies an access file; ``reload()`` re-reads it (a broken file keeps the old one)."""

    name = "access"

    def __init__(
        self,
        path: str,
        contact_domain: str,
        disposition: Literal["discard", "quarantine"] = "discard",
        quarantine_dir: str = "",
        local_forms: Callable[[Client, Address], list[Address]] | None = None,
    ) -> None:
        """``contact_domain``: whose postmaster a refusal tells the sender to write to
        (one this server takes mail for).  ``local_forms``: the other spellings of a
        local recipient (RecipientStep.local_forms), which recipient rules are matched
        against too."""
        self._contact = contact_domain
        self._local_forms = local_forms
        self._blocked_tags = (("disposition", disposition),)
        if disposition == "quarantine":
            self._blocked_tags += (("quarantine_dir", quarantine_dir),)
        self._rules = AccessList.load(path)

    async def connect(self, client: Client) -> Verdict:
        for key in ("access_ip", "access_ip_rule"):
            client.tags.pop(key, None)
        rule = None if is_trusted(client) else self._rules.match_ip(client.ip)
        if rule is not None:
            client.tags["access_ip"] = rule.action
            client.tags["access_ip_rule"] = rule.where
        return ACCEPT

    async def mail(self, client: Client, envelope: Envelope) -> Verdict:
        client.tags.pop("access", None)
        if is_trusted(client):
            return ACCEPT
        matched = [rule for rule in self._mail_rules(client, envelope) if rule is not None]
        if not matched:
            return ACCEPT
        winner = min(matched, key=lambda rule: ACTIONS.index(rule.action))
        client.tags["access_rule"] = winner.where
        if winner.action == "allow":
            client.tags["access"] = "allow"
            return ACCEPT
        client.filter_state = winner.state
        tags = (("check", self.name), ("reason", winner.action), ("rule", winner.where))
        host = self._contact
        if winner.action == "deny" and winner.kind == "sender":
            return Verdict(reply("access.denied", sender=envelope.sender, host=host), tags=tags)
        if winner.action == "deny":
            return Verdict(reply("access.client_denied", ip=client.ip, host=host), tags=tags)
        if winner.action == "dialup":
            return Verdict(reply("access.dialup"), tags=tags)
        if winner.action == "delay":
            return Verdict(reply("access.delay"), tags=tags)
        return ACCEPT  # block: refused after the data, in message()

    async def rcpt(self, client: Client, envelope: Envelope, recipient: Recipient) -> Verdict:
        # Not excused by an `allow` rule on the client's HELO or sender, which it can
        # forge: a spam trap or a refused address holds for every untrusted client, as
        # upas's refused-recipient list did.
        if is_trusted(client):
            return ACCEPT
        rule = self._recipient_rule(client, recipient.address)
        if rule is None or rule.action == "allow":
            return ACCEPT
        if rule.action == "block":  # a spam trap: the whole message is BLOCKED
            client.filter_state = rule.state
            client.tags["access_rule"] = rule.where
            return ACCEPT
        tags = (("check", self.name), ("reason", rule.action), ("rule", rule.where))
        if rule.action == "delay":
            return Verdict(reply("access.delay"), tags=tags)
        return Verdict(reply("access.rcpt_denied", address=recipient.address), tags=tags)

    async def message(self, client: Client, envelope: Envelope, body: Spooled) -> Verdict:
        if client.filter_state != "BLOCKED":
            return ACCEPT
        if envelope.recipients and all(
            _allowed(self._recipient_rule(client, r.address)) for r in envelope.recipients
        ):
            client.filter_state = "ACCEPT"  # every recipient opted out of filtering
            return ACCEPT
        tags = (("check", self.name), ("reason", "block"), *self._blocked_tags)
        return Verdict(reply("access.blocked"), tags=tags)

    def _recipient_rule(self, client: Client, address: Address) -> Rule | None:
        """The strongest rule for ``address`` in any of its spellings (in the order
        of ACTIONS, as for the other kinds): alice+x@ and alice@[our address] are
        alice@ our domain, and a rule about alice holds for them (a deny, a spam
        trap, an opt-out alike), as one about alice+x@ holds for alice+x@[]."""
        spellings = [address, *(self._local_forms(client, address) if self._local_forms else ())]
        rules = [r for r in (self._rules.match_address("recipient", a) for a in spellings) if r]
        return min(rules, key=lambda rule: ACTIONS.index(rule.action)) if rules else None

    def _mail_rules(self, client: Client, envelope: Envelope) -> list[Rule | None]:
        ip_action = client.tags.get("access_ip")
        ip_rule = None
        if ip_action in FILTER_STATE:
            where = client.tags.get("access_ip_rule", "")
            ip_rule = Rule(ip_action, "ip", str(client.ip), where)
        helo = client.helo or envelope.helo
        sender = envelope.sender
        return [
            ip_rule,
            self._rules.match_helo(helo) if helo else None,
            self._rules.match_address("sender", sender) if sender is not None else None,
        ]


def _allowed(rule: Rule | None) -> bool:
    return rule is not None and rule.action == "allow"
