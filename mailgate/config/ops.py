"""The [logging] and [metrics] sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LoggingConfig:
    format: Literal["logfmt", "json", "syslog"] = "logfmt"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass
class MetricsConfig:
    listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: off
