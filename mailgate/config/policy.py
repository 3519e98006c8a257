"""The [policy] and [greylist] sections."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PolicyConfig:
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    helo_checks: bool = True
    helo_refusal: Literal["reply", "hangup"] = "reply"  # 550 and go on, or 421 and close


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
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("greylist.redis_url: must start with redis://, rediss:// or unix://")
        for network in self.whitelist:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"greylist.whitelist: not a network: {network!r}") from None
