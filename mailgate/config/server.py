"""The [server] section and the [[listener]] entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mailgate.config.names import domain_problem

MAX_WORKERS = 64
MIN_MESSAGE_SIZE = 65_536  # RFC 5321 4.5.3.1.7
MIN_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8
# A client waits 5 minutes for the greeting (RFC 5321 4.5.3.2.1); senders that give up
# sooner exist, and a longer pause only holds connections open.
MAX_GREET_PAUSE = 30.0


@dataclass
class ListenerConfig:
    """One listening socket and its role (RFC 8314 / RFC 6409 roles)."""

    address: str = "127.0.0.1:2525"  # HOST:PORT, [IPv6]:PORT
    role: Literal["public", "submission", "smtps"] = "public"
    # submission: refuse MAIL/AUTH before STARTTLS (RFC 8314 section 3.3)
    require_tls: bool = False
    # allow AUTH PLAIN/LOGIN without TLS on this listener (never on the internet)
    allow_plaintext_auth: bool = False
    # accept a PROXY v1/v2 header from the addresses in server.proxy_from
    proxy_protocol: bool = False


@dataclass
class ServerConfig:
    hostname: str = ""  # empty: the machine's fully qualified name
    max_message_size: int = 36_700_160  # octets, advertised as SIZE (RFC 1870)
    max_recipients: int = 100  # per transaction (RFC 5321 4.5.3.1.8: at least 100)
    # permanent refusals (5xx) before "421 4.7.0 Too many errors"; temporary ones and
    # messages their destinations failed are no misbehaviour of the client's (junk
    # commands past junk_command_limit count too)
    max_errors: int = 20
    # NOOP, RSET, VRFY and HELP a client may send between two transactions (MAILs
    # accepted); past it each one counts towards max_errors (a client stalling with
    # them is closed with 421)
    junk_command_limit: int = 100
    tarpit_delay: float = 0.0  # seconds before the nth counted refusal: delay * 2**(n-1)
    tarpit_max_delay: float = 30.0
    helo_delay: float = 0.0  # seconds before the HELO/EHLO reply (upas -D)
    # seconds an untrusted client of a public listener waits for the greeting; one
    # that talks before it (RFC 5321 3.1 says wait) is refused at MAIL (upas, 2014)
    greet_pause: float = 0.0
    # RFC 5321 4.5.3.2.7: 5 minutes for a whole command line (not per read, so a
    # client trickling one byte at a time cannot hold a connection for ever)
    command_timeout: float = 300.0
    data_timeout: float = 180.0  # RFC 5321 4.5.3.2.5: 3 minutes per data block
    # seconds a transaction under way may take to finish after SIGTERM (sessions
    # without one are told 421 at once)
    shutdown_grace: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    # bare LF or CR in commands or data: refuse (default) or, for clients in
    # normalize_bare_lf_from, treat a bare LF as CRLF.  End-of-data is CRLF.CRLF always.
    normalize_bare_lf_from: list[str] = field(default_factory=list)
    proxy_from: list[str] = field(default_factory=list)  # load balancers allowed to send PROXY
    vrfy: bool = False  # answer VRFY from the recipient tables instead of 252
    spool_dir: str = "spool"
    # processes serving connections: 1 (one process), N, or 0 for one per CPU.  The
    # connection limits and AUTH failure counts hold for the whole server
    # (see docs/deployment.md).
    workers: int = 1
    user: str = ""  # drop privileges to this user after binding (when started as root)
    group: str = ""

    def __post_init__(self) -> None:
        # the greeting, EHLO reply, Received: and DSNs carry it: ASCII labels only
        problem = domain_problem(self.hostname) if self.hostname else None
        if problem:
            raise ValueError(f"hostname: {problem}")
        if not 0 <= self.greet_pause <= MAX_GREET_PAUSE:
            raise ValueError(
                f"greet_pause: from 0 (off) to {MAX_GREET_PAUSE:g} seconds, not {self.greet_pause}"
            )
        if not self.spool_dir.strip():  # (the current directory: never meant)
            raise ValueError("spool_dir: must not be empty")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers: from 0 (one per CPU) to {MAX_WORKERS}, not {self.workers}")
        # Floors below which the server would refuse all mail or contradict itself
        # (SIZE 0 announces "no limit"), and those RFC 5321 sets.
        floors = (
            ("max_message_size", self.max_message_size, MIN_MESSAGE_SIZE,
             "octets (RFC 5321 4.5.3.1.7: 64K must be accepted)"),
            ("max_recipients", self.max_recipients, MIN_RECIPIENTS,
             "(RFC 5321 4.5.3.1.8: 100 must be accepted)"),
            ("max_errors", self.max_errors, 1, ""),
            ("junk_command_limit", self.junk_command_limit, 1, ""),
            ("max_connections", self.max_connections, 1, ""),
            ("max_connections_per_ip", self.max_connections_per_ip, 1, ""),
        )
        for name, value, least, why in floors:
            if value < least:
                raise ValueError(f"{name}: at least {least}{' ' + why if why else ''}, not {value}")
