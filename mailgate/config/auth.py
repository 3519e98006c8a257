"""The [auth] and [tls] sections."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from mailgate.config.names import domain_problem

# Every SASL mechanism mailgate implements, in the default advertisement order
# (strongest first: clients that pick the first one they know get the best).
KNOWN_MECHANISMS = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")


@dataclass
class AuthConfig:
    users_file: str = ""  # empty: AUTH is not offered
    # offered in this order; a mechanism is left out when no user in the users file
    # has a credential it can use (see docs/authentication.md)
    mechanisms: list[str] = field(default_factory=lambda: list(KNOWN_MECHANISMS))
    # which MAIL FROM addresses an authenticated user may use: user -> list of
    # addresses, "@domain" (any address there) or "*" (anything, including <>).
    # A user with no entry may use only <user>@<a local domain>.
    senders: dict[str, list[str]] = field(default_factory=dict)
    senders_file: str = ""  # more entries, one "user: address, @domain, ..." per line
    # domains where <user>@domain is the user's own by default; empty: the server's
    # local domains (what [delivery] local_domains resolves to)
    sender_domains: list[str] = field(default_factory=list)
    throttle_after: int = 5  # failures from one client address before 454 4.7.0
    throttle_close_after: int = 10  # failures before 421 4.7.0 and closing the connection
    throttle_window: float = 900.0  # seconds after the last failure when a count is forgotten
    failure_delay: float = 0.5  # seconds before replying to the nth failure: delay * 2**(n-1)
    failure_max_delay: float = 10.0  # the cap of that delay
    # seconds between checks of the users file for changes (then it is re-read);
    # 0: only on an explicit reload (SIGHUP)
    reload_interval: float = 2.0

    def __post_init__(self) -> None:
        self.mechanisms = [m.upper() for m in self.mechanisms]
        unknown = [m for m in self.mechanisms if m not in KNOWN_MECHANISMS]
        if unknown:
            raise ValueError(
                f"mechanisms: unknown {', '.join(map(json.dumps, unknown))}; "
                f"known: {', '.join(KNOWN_MECHANISMS)}"
            )
        if len(set(self.mechanisms)) != len(self.mechanisms):
            raise ValueError("mechanisms: a mechanism is listed twice")
        for i, domain in enumerate(self.sender_domains, 1):
            # (as delivery.local_domains: a typo would never match a sender; a
            # trailing dot is allowed, as the senders lists allow it)
            problem = domain_problem(domain.removesuffix("."), idna=True)
            if problem:
                raise ValueError(f"sender_domains[{i}]: {problem}")
        if self.throttle_after < 1:
            raise ValueError("throttle_after: must be at least 1")
        if self.throttle_close_after < self.throttle_after:
            raise ValueError("throttle_close_after: must not be less than throttle_after")
        for name in ("throttle_window", "failure_delay", "failure_max_delay", "reload_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative")
        for user, addresses in self.senders.items():
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise ValueError(f"senders.{user}: must be a list of addresses")
            bad = next((a for a in addresses if not _sender_entry_ok(a)), None)
            if bad is not None:
                raise ValueError(f"senders.{user}: {bad!r} is not an address, @domain or *")


def _sender_entry_ok(entry: str) -> bool:
    """An address, "@domain" or "*" (the same rule as mailgate.auth.senders)."""
    _, at, domain = entry.rpartition("@")
    return entry == "*" or bool(at and domain and " " not in entry)


# ECDHE for forward secrecy, AEAD ciphers only.  Applies to TLS 1.2; OpenSSL's TLS 1.3
# suites are all AEAD already and are not affected by this string.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass
class TLSConfig:
    cert: str = ""  # empty: STARTTLS is not offered (unless certificates is set)
    key: str = ""
    # more certificates chosen by SNI: a list of {cert = "...", key = "..."}; each one
    # serves the names in its subjectAltName.  cert/key above (when set) come first;
    # the first certificate is also the default when SNI matches nothing.
    certificates: list[dict[str, str]] = field(default_factory=list)
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str = DEFAULT_CIPHERS  # OpenSSL cipher string for TLS 1.2

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert, key: give both or neither")
        for i, entry in enumerate(self.certificates, 1):
            if set(entry) != {"cert", "key"} or not all(entry.values()):
                raise ValueError(f"certificates[{i}]: needs exactly cert and key")
        if self.min_version not in ("1.2", "1.3"):
            raise ValueError('min_version: must be "1.2" or "1.3"')

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every (cert, key) file pair, the default one first."""
        first = [(self.cert, self.key)] if self.cert else []
        return first + [(e["cert"], e["key"]) for e in self.certificates]
