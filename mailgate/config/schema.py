"""The whole configuration: one dataclass per TOML section, with embedded defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailgate.config.auth import AuthConfig, TLSConfig
from mailgate.config.delivery import DeliveryConfig
from mailgate.config.ops import LoggingConfig, MetricsConfig
from mailgate.config.policy import GreylistConfig, PolicyConfig
from mailgate.config.server import ListenerConfig, ServerConfig


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    listener: list[ListenerConfig] = field(default_factory=lambda: [ListenerConfig()])
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
