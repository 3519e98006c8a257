"""The whole configuration: one dataclass per TOML section, with embedded defaults."""

from __future__ import annotations

import ipaddress
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
        self.check_listeners()

    def check_listeners(self) -> None:
        """What serve could not listen with; ValueError naming the listener.  Run again
        on listeners given on the command line (``serve --listen``)."""
        if not self.listener:
            raise ValueError("listener: at least one [[listener]] (with none, no mail is taken)")
        # Two listeners on one address would fail at bind: say so in check-config
        # already.  Port 0 asks the kernel for a free port, a different one each time.
        seen: dict[tuple[object, int], int] = {}
        for n, entry in enumerate(self.listener, 1):
            host, port = _host_port(entry.address)
            problem = _bind_problem(host)
            if problem:
                raise ValueError(f"listener[{n}].address: {entry.address}: {problem}")
            if port == 0:
                continue
            for (other, other_port), m in seen.items():
                if other_port == port and _overlap(host, other):
                    raise ValueError(
                        f"listener[{n}].address: {entry.address} overlaps the address of "
                        f"listener[{m}] ({self.listener[m - 1].address}): both cannot listen"
                    )
            seen[(host, port)] = n
        if self.metrics.listen:  # (its own socket, bound at start as the listeners are)
            host, port = _host_port(self.metrics.listen)
            for (other, other_port), m in seen.items():
                if port != 0 and other_port == port and _overlap(host, other):
                    raise ValueError(
                        f"metrics.listen: {self.metrics.listen} overlaps the address of "
                        f"listener[{m}] ({self.listener[m - 1].address}): both cannot listen"
                    )
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


def _host_port(address: str) -> tuple[object, int]:
    """(an ip_address, or the host name in lower case; the port) of "HOST:PORT" (the
    loader has checked the form)."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    try:
        parsed: object = ipaddress.ip_address(host)
    except ValueError:
        parsed = host.lower()
    return parsed, int(port) if port.isdigit() else -1


def _bind_problem(host: object) -> str | None:
    """What the kernel would refuse at bind, said before: EINVAL for these."""
    if isinstance(host, ipaddress.IPv6Address):
        if host.ipv4_mapped is not None:
            return f"write the IPv4 address {host.ipv4_mapped} (a mapped one cannot be bound)"
        if host.is_link_local and not host.scope_id:
            return "a link-local address needs its interface, as in [fe80::1%eth0]"
    return None


# "localhost" binds its loopback addresses (the one host name worth knowing here:
# others would take a DNS lookup to compare, and may change meanwhile)
_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _overlap(a: object, b: object) -> bool:
    """Whether listening on both, on one port, fails: the same address (however
    written), or a wildcard (0.0.0.0, ::) and an address of its family."""
    if a == b:
        return True
    if a == "localhost" or b == "localhost":
        other = b if a == "localhost" else a
        return any(_overlap(loopback, other) for loopback in _LOCALHOST)
    if isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address) and type(a) is type(b):
        return a.is_unspecified or b.is_unspecified  # type: ignore[attr-defined]
    return False
