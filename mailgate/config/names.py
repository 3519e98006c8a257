"""Host and domain name syntax, one definition for every key that names one."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re

# RFC 1035/1123 labels: letters, digits and inner hyphens, at most 63 octets.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# RFC 5321 Domain, as the greeting, EHLO, Received: and local domains name one.
DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
# A host to connect to or listen on: a DNS name may end with the root's dot.
HOST = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted_key(parent: str, name: str) -> str:
    """Key ``name`` of table ``parent`` as TOML writes it: quoted unless it is a bare
    key (``delivery.aliases."sales@example.org"``), so an error names it as written."""
    part = name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)
    return f"{parent}.{part}" if parent else part


def domain_problem(name: str, idna: bool = False) -> str | None:
    """Why ``name`` is no domain name, or None.  With ``idna``, an internationalized
    domain (SMTPUTF8 mail may name one, RFC 6531) is checked in its ASCII form."""
    ascii_form = name
    if idna and not name.isascii():
        # not encodable: the pattern refuses it as it is
        with contextlib.suppress(UnicodeError):
            ascii_form = name.encode("idna").decode("ascii")
    if DOMAIN.fullmatch(ascii_form):
        return None
    # (shown cut, as every value in an error: a 4 MB name made a 4 MB line)
    shown = name if len(name) <= 60 else name[:57] + "..."
    return (f"{json.dumps(shown, ensure_ascii=False)} is not a domain name "
            "(dot-separated labels of letters, digits and inner hyphens, no trailing dot)")


def parse_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of "[192.0.2.1]" or "[IPv6:2001:db8::1]" (any case), else None."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None
