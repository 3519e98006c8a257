"""Which MAIL FROM addresses an authenticated user may use.

Rules, checked in this order (addresses compare ignoring case, and a domain's U-label
and A-label spellings as one):

1. A user listed in the senders map may use exactly what is listed: a full address
   (``alice@example.org``), every address of a domain (``@example.org``), or ``*``
   (anything, the null sender ``<>`` included).  Listing a user replaces rule 2, so a
   listed user who should keep their own address lists it too.
2. A user not listed may use ``<user>@<d>`` for each default domain ``d`` (the
   configured sender_domains, else the server's local domains).  When the user name
   is itself an address (``alice@example.org``), that exact address.
3. Nothing else; in particular not the null sender.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from mailgate.protocol.idn import domain_key

_COMMENT = re.compile(r"(?:^|\s)#.*$")


def parse_senders_file(text: str, path: str) -> dict[str, list[str]]:
    """``user: address, @domain, *`` lines; ValueError "path:line: problem"."""
    table: dict[str, list[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        # "#" starts a comment at the start of a line or after white space, as in an
        # access list: a#b@example.org is an address
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        user, colon, rest = line.partition(":")
        user = user.strip()
        entries = [e.strip() for e in rest.split(",") if e.strip()]
        if not colon or not user or not entries:
            raise ValueError(f"{path}:{number}: expected 'user: address, @domain, ...'")
        bad = next((e for e in entries if not _valid_entry(e)), None)
        if bad is not None:
            raise ValueError(f"{path}:{number}: {bad[:64]!r} is not an address, @domain or *")
        table.setdefault(user, []).extend(entries)
    return table


def _valid_entry(entry: str) -> bool:
    if entry == "*":
        return True
    _, at, domain = entry.rpartition("@")
    return bool(at and domain and " " not in entry)


class SenderMap:
    def __init__(self, table: Mapping[str, Iterable[str]], default_domains: Iterable[str]):
        for user, entries in table.items():
            bad = next((e for e in entries if not _valid_entry(e)), None)
            if bad is not None:
                raise ValueError(f"senders: {user}: {bad[:64]!r} is not an address, @domain or *")
        self._table = {user: frozenset(map(_comparable, table[user])) for user in table}
        self._domains = frozenset(domain_key(d.rstrip(".")) for d in default_domains)

    def may_send_as(self, user: str, address: str) -> bool:
        address = _comparable(address.strip().removeprefix("<").removesuffix(">"))
        local, at, domain = address.rpartition("@")
        listed = self._table.get(user)
        if listed is not None:
            return "*" in listed or (bool(at) and (address in listed or f"@{domain}" in listed))
        if not at or not local:
            return False
        if "@" in user:
            return address == _comparable(user)
        return local == user.lower() and domain in self._domains


def _comparable(address: str) -> str:
    """An address (or ``@domain``, or ``*``) in the form it is compared in."""
    local, at, domain = address.rpartition("@")
    return f"{local.lower()}@{domain_key(domain.rstrip('.'))}" if at else address.lower()
