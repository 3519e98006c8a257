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

    def __post_init__(self) -> None:
        if not self.listener:
            raise ValueError("listener: at least one [[listener]] (with none, no mail is taken)")
        # Two listeners on one address would fail at bind: say so in check-config
        # already.  Port 0 asks the kernel for a free port, a different one each time.
        seen: dict[str, int] = {}
        for n, entry in enumerate(self.listener, 1):
            address = entry.address.lower()
            port = address.rpartition(":")[2]
            if port.isdigit() and int(port) == 0:
                continue
            if address in seen:
                raise ValueError(
                    f"listener[{n}].address: {entry.address} is already the address of "
                    f"listener[{seen[address]}]"
                )
            seen[address] = n
        for n, entry in enumerate(self.listener, 1):
            # Settings that leave a listener unable to take any mail, refused here
            # rather than found by the first client.
            if entry.address.startswith(("/", "unix:")):
                raise ValueError(f"listener[{n}].address: HOST:PORT, not a Unix socket")
            if entry.proxy_protocol and not self.server.proxy_from:
                raise ValueError(
                    f"listener[{n}].proxy_protocol: needs server.proxy_from (a PROXY header "
                    "is taken only from those addresses: every connection would be refused)"
                )
            if entry.role != "public" and self.auth.users_file and not self.auth.mechanisms:
                raise ValueError(
                    f"listener[{n}].role: {entry.role} requires AUTH, and auth.mechanisms "
                    "is empty"
                )
        # Without a certificate these listeners could never take mail: smtps speaks
        # TLS from the first byte, and require_tls waits for a STARTTLS not offered.
        if not self.tls.pairs:
            for n, entry in enumerate(self.listener, 1):
                if entry.role == "smtps":
                    raise ValueError(f"listener[{n}].role: smtps needs [tls] cert and key")
                if entry.require_tls:
                    raise ValueError(
                        f"listener[{n}].require_tls: STARTTLS needs [tls] cert and key"
                    )
