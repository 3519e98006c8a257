"""The [delivery] section: destinations and routing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeliveryConfig:
    maildir_root: str = "maildir"
    local_domains: list[str] = field(default_factory=list)  # empty: hostname and localhost
