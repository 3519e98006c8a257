"""The [policy] and [greylist] sections."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from mailgate.config.names import domain_problem, parse_literal


@dataclass
class PolicyConfig:
    """The upas policy checks: trust, HELO, sender, recipients, access lists, DNSBL."""

    # CIDR blocks (IPv4 and IPv6) whose clients may relay and skip sender verification
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # other names of this server, besides the hostname, that a client's HELO may not claim
    local_names: list[str] = field(default_factory=list)
    helo_checks: bool = True  # refuse lying or reserved (RFC 2606/6761) HELO/EHLO names
    helo_refusal: Literal["reply", "hangup"] = "reply"  # 550 and go on, or 421 and close
    # refuse a HELO address literal ([192.0.2.1]) that is not the client's own address
    helo_literal_must_match: bool = False
    # MAIL FROM domain must exist in DNS (A, AAAA or MX) and must not be a null MX
    verify_sender_domain: bool = True
    # nameservers for sender, DNSBL and client-name lookups, "ip" or "ip:port"
    # ("[v6]:port"); empty: the system resolver (/etc/resolv.conf)
    dns_servers: list[str] = field(default_factory=list)
    dns_timeout: float = 5.0  # seconds for one lookup, all nameservers tried included
    # look up each client's name at connect (PTR, confirmed by its A/AAAA records) for
    # the Received: field and the log; loopback clients are localhost without a lookup
    reverse_lookup: bool = True
    access_file: str = ""  # allow/deny/block/delay/dialup rules (docs/access-lists.md)
    dnsbl_zones: list[str] = field(default_factory=list)  # e.g. ["zen.spamhaus.org"]; empty: off
    # what the server does with a BLOCKED message after answering 554: throw it away,
    # or keep it in quarantine_dir for a human to look at
    blocked_disposition: Literal["discard", "quarantine"] = "discard"
    quarantine_dir: str = ""  # required when blocked_disposition = "quarantine"
    # accept the upas loopback form user@[] as a local recipient
    allow_loopback_literal: bool = False
    # more Received: fields than this (ours included) is a mail loop: 554 5.4.6
    # (RFC 5321 6.3: at least 100)
    max_received_headers: int = 100

    def __post_init__(self) -> None:
        if self.helo_refusal not in ("reply", "hangup"):
            raise ValueError(
                f"policy.helo_refusal: must be reply or hangup, not {self.helo_refusal!r}"
            )
        if self.blocked_disposition not in ("discard", "quarantine"):
            raise ValueError(
                "policy.blocked_disposition: must be discard or quarantine, "
                f"not {self.blocked_disposition!r}"
            )
        if self.blocked_disposition == "quarantine" and not self.quarantine_dir:
            raise ValueError(
                "policy.quarantine_dir: required when blocked_disposition = quarantine"
            )
        if self.max_received_headers < 1:
            raise ValueError("policy.max_received_headers: must be at least 1")
        if not self.dns_timeout > 0:
            raise ValueError("policy.dns_timeout: must be positive")
        for n, network in enumerate(self.trusted_networks, 1):
            try:
                ipaddress.ip_network(network, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"policy.trusted_networks[{n}]: {json.dumps(network)}: {exc}") from None
        for n, name in enumerate(self.local_names, 1):
            # a name a HELO can be compared with: a typo would never match
            if name.startswith("["):
                problem = None if parse_literal(name) is not None else (
                    f"{json.dumps(name)}: not an address literal such as [192.0.2.1] or "
                    "[IPv6:2001:db8::1]"
                )
            else:
                problem = domain_problem(name.removesuffix("."), idna=True)
            if problem:
                raise ValueError(f"policy.local_names[{n}]: {problem}")
        for n, server in enumerate(self.dns_servers, 1):
            try:
                parse_nameserver(server)
            except ValueError as exc:
                raise ValueError(f"policy.dns_servers[{n}]: {exc}") from None
        for n, zone in enumerate(self.dnsbl_zones, 1):
            # a malformed zone would never answer "listed": a blocklist doing nothing
            problem = domain_problem(zone[:-1] if zone.endswith(".") else zone)
            if problem:
                raise ValueError(f"policy.dnsbl_zones[{n}]: {problem}")


def _check_redis_url(url: str) -> None:
    """What redis-py would refuse only when it connects (at start, after check-config
    said OK), by its own URL parser, and a database that is no number (which it
    quietly takes as 0).  Messages never show the URL's password."""
    from redis.connection import parse_url

    try:
        parts = urlsplit(url)
    except ValueError as exc:  # (e.g. "Invalid IPv6 URL": the URL is not shown, nor its password)
        raise ValueError(f"greylist.redis_url: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("greylist.redis_url: must start with redis://, rediss:// or unix://")
    shown = repr(_without_password(url))
    try:
        parse_url(url)
        parts.port  # noqa: B018 (urllib checks the port when it is read)
    except ValueError as exc:
        raise ValueError(f"greylist.redis_url: {shown}: {exc}") from None
    if not (parts.path if parts.scheme == "unix" else parts.hostname):
        raise ValueError(f"greylist.redis_url: {shown}: no host (or socket path)")
    database = parts.path.lstrip("/") if parts.scheme != "unix" else "0"
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(f"greylist.redis_url: {shown}: the database must be a number, "
                         "as in redis://127.0.0.1:6379/0")


def _without_password(url: str) -> str:
    """``url`` with its password, if any, as "***" (error messages end up in logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def parse_nameserver(text: str) -> tuple[str, int]:
    """("192.0.2.1", 53) from "192.0.2.1", "192.0.2.1:53", "2001:db8::1" or "[2001:db8::1]:53"."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an ip or ip:port: {text!r}") from None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


@dataclass
class GreylistConfig:
    """Greylisting (RFC 6647) of (client network, sender, recipient) triplets."""

    enabled: bool = False  # off by default: greylisting delays first mail by min_delay
    # when to defer: per recipient at RCPT, or once for the transaction at DATA (the
    # message passes at DATA if any of its triplets has passed; see policy/greylist.py)
    stage: Literal["rcpt", "data"] = "rcpt"
    min_delay: float = 300.0  # seconds before a retry is accepted (RFC 6647 practice: 5 min)
    # seconds a deferred triplet waits for its retry before it counts as new again; two
    # days leave room for senders that back off (RFC 5321 4.5.4.1 retries for 4-5 days)
    pending_expiry: float = 2 * 86400.0
    # seconds a passed triplet stays accepted without delay, renewed on each message
    pass_expiry: float = 36 * 86400.0
    # where the triplets live: a local SQLite file, or Redis shared by several instances
    backend: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = "greylist.sqlite"  # with backend = "sqlite"; relative to the cwd
    redis_url: str = "redis://127.0.0.1:6379/0"  # with backend = "redis"
    redis_timeout: float = 2.0  # seconds per Redis call before it fails open
    # client networks (CIDR) never greylisted, e.g. big senders that retry from other hosts
    whitelist: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stage not in ("rcpt", "data"):
            raise ValueError(f"greylist.stage: must be rcpt or data, not {self.stage!r}")
        if self.backend not in ("sqlite", "redis"):
            raise ValueError(f"greylist.backend: must be sqlite or redis, not {self.backend!r}")
        if self.min_delay < 0:
            raise ValueError("greylist.min_delay: must not be negative")
        if self.pending_expiry <= self.min_delay:
            raise ValueError("greylist.pending_expiry: must be longer than min_delay")
        if self.pass_expiry <= 0:
            raise ValueError("greylist.pass_expiry: must be positive")
        if self.redis_timeout <= 0:
            raise ValueError("greylist.redis_timeout: must be positive")
        if not self.sqlite_path:
            raise ValueError("greylist.sqlite_path: must not be empty")
        _check_redis_url(self.redis_url)
        for n, network in enumerate(self.whitelist, 1):
            try:  # host bits set: a typo for one host would whitelist a whole network
                ipaddress.ip_network(network, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"greylist.whitelist[{n}]: {json.dumps(network)}: {exc}") from None
