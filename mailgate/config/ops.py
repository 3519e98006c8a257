"""The [logging] and [metrics] sections."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

SyslogFacility = Literal[
    "mail", "daemon", "user", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
]  # fmt: skip


@dataclass
class LoggingConfig:
    # logfmt: key=value lines on stderr (journald keeps them); json: one JSON object a
    # line on stderr; syslog: the logfmt text sent to a syslog daemon (syslog_address)
    format: Literal["logfmt", "json", "syslog"] = "logfmt"
    level: Literal["debug", "info", "warning", "error"] = "info"  # the least severe logged
    # where syslog lines go: a Unix socket path or HOST:PORT (UDP);
    # empty: /dev/log when it exists, else 127.0.0.1:514
    syslog_address: str = ""
    syslog_facility: SyslogFacility = "mail"


# Delivery latencies run from milliseconds (Maildir) to minutes (a slow smarthost).
DEFAULT_LATENCY_BUCKETS = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
]  # fmt: skip


@dataclass
class MetricsConfig:
    listen: str = ""  # HOST:PORT of the Prometheus endpoint, e.g. "127.0.0.1:9125"; empty: off
    # upper bounds (seconds) of the delivery latency histogram's buckets
    latency_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_LATENCY_BUCKETS))

    def __post_init__(self) -> None:
        buckets = self.latency_buckets
        if not buckets:
            raise ValueError("latency_buckets: must not be empty")
        if any(not math.isfinite(b) or b <= 0 for b in buckets):
            raise ValueError("latency_buckets: every bound must be a positive number of seconds")
        if any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError("latency_buckets: bounds must be in increasing order")
