"""The [policy] and [greylist] sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PolicyConfig:
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    helo_checks: bool = True
    helo_refusal: Literal["reply", "hangup"] = "reply"  # 550 and go on, or 421 and close


@dataclass
class GreylistConfig:
    enabled: bool = False
