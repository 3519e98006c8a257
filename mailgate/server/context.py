"""What every session of one server shares: the configured parts and the counters."""

from __future__ import annotations

import asyncio
import enum
import ipaddress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mailgate.config.schema import Config
from mailgate.config.server import ListenerConfig
from mailgate.delivery.base import Delivery, RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.dsn import (
    HEADER_LIMIT,
    bounce_envelope,
    bounce_recipients,
    build_dsn,
    for_report,
    header_section,
    read_returned,
    success_recipients,
)
from mailgate.delivery.spool import SpoolDir
from mailgate.ops.logging import outside_sessions
from mailgate.ops.metrics import Metrics
from mailgate.policy.base import Mailboxes, Policy
from mailgate.policy.networks import parse_network, unmap
from mailgate.protocol.connection import Settings
from mailgate.protocol.envelope import Envelope
from mailgate.protocol.replies import Reply, reply
from mailgate.server.limits import ConnectionCounts

if TYPE_CHECKING:
    from mailgate.server.session import Session

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Report(enum.Enum):
    """What became of a failure report to the sender (ServerContext.bounce)."""

    SENT = "sent"  # durable (or not wanted: NOTIFY=NEVER)
    DEFER = "defer"  # failed for now: a retry of the message may get it through
    IMPOSSIBLE = "impossible"  # no retry can: the null sender, or refused for good


def parse_networks(items: list[str]) -> list[Network]:
    """As trusted_networks reads them (an IPv4-mapped entry is its IPv4 network)."""
    return [parse_network(item) for item in items]


def in_networks(ip: IPAddress, networks: list[Network]) -> bool:
    ip = unmap(ip)  # (a dual-stack listener's IPv4 clients)
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass
class ListenerContext:
    name: str
    config: ListenerConfig
    settings: Settings
    settings_normalized: Settings  # for clients allowed to end lines with bare LF
    implicit_tls: bool


def listener_settings(
    config: Config, listener: ListenerConfig, hostname: str, starttls: bool,
    mechanisms: list[str], auth_configured: bool,
) -> Settings:
    """What a listener's sessions start with.  ``mechanisms``: those some user can
    pass now (they change as the users file does); submission and smtps require AUTH
    whenever [auth] is configured, even while no user can pass any (RFC 6409 4.3)."""
    server = config.server
    return Settings(
        hostname=hostname,
        max_message_size=server.max_message_size,
        max_recipients=server.max_recipients,
        max_errors=server.max_errors,
        junk_command_limit=server.junk_command_limit,
        starttls=starttls and listener.role != "smtps",
        auth_mechanisms=tuple(mechanisms),
        allow_plaintext_auth=listener.allow_plaintext_auth,
        require_tls=listener.require_tls and listener.role != "smtps",
        require_auth=listener.role in ("submission", "smtps") and auth_configured,
        vrfy=server.vrfy,
    )


class ServerContext:
    def __init__(
        self,
        *,
        config: Config,
        hostname: str,
        policy: Policy,
        delivery: Delivery,
        mailboxes: Mailboxes,
        spool: SpoolDir,
        authenticator: Any,
        tls: Any,
        metrics: Metrics,
        counts: ConnectionCounts | None = None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.policy = policy
        self.delivery = delivery
        self.mailboxes = mailboxes
        self.spool = spool
        self.authenticator = authenticator
        self.tls = tls
        self.metrics = metrics
        self.sessions: set[Session] = set()
        # shared with the other worker processes, if any (the limits are server-wide)
        self.counts = counts or ConnectionCounts()
        self._sweep: asyncio.TimerHandle | None = None
        self._normalize = parse_networks(config.server.normalize_bare_lf_from)
        self._proxy_from = parse_networks(config.server.proxy_from)

    def use_config(self, config: Config, hostname: str) -> None:
        """A reload's configuration and name for new work (and what is made of them)."""
        self.config = config
        self.hostname = hostname
        self._normalize = parse_networks(config.server.normalize_bare_lf_from)
        self._proxy_from = parse_networks(config.server.proxy_from)

    def normalize_bare_lf(self, ip: IPAddress) -> bool:
        return bool(self._normalize) and in_networks(ip, self._normalize)

    def proxy_allowed(self, ip: IPAddress) -> bool:
        return in_networks(ip, self._proxy_from)

    def admit(self, session: Session) -> Reply | None:
        """Connection limits, before the greeting: None, or the 421 to send."""
        assert session.client is not None
        refusal = self.admit_address(session.client.ip)
        session.admitted = refusal is None
        return refusal

    def admit_address(self, ip: IPAddress) -> Reply | None:
        """Count a connection from ``ip`` in the limits, or the 421 that refuses it
        (then it is not counted).  Whoever admits gives the place back (release)."""
        limits = self.config.server
        refused = self.counts.try_add(ip, limits.max_connections, limits.max_connections_per_ip)
        if refused == "total":
            return reply("closing.too_many_connections", host=self.hostname)
        if refused == "address":
            return reply("closing.too_many_from_client", host=self.hostname)
        return None

    def release(self, session: Session) -> None:
        if session.admitted:
            session.admitted = False
            assert session.client is not None
            self.counts.remove(session.client.ip)

    def watch_deadlines(self) -> None:
        """Make sure waiting sessions are checked for their timeout.

        One timer for the whole server instead of one per session: a timer handle
        cost ~600 bytes, more than a tenth of an idle session.  A session times out
        at most one sweep interval after its deadline (a tenth of the shortest
        timeout, at most a second), which RFC 5321's minutes-long timeouts allow.
        """
        if self._sweep is None:
            settings = self.config.server
            interval = min(1.0, settings.command_timeout / 10, settings.data_timeout / 10)
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(max(interval, 0.01), self._sweep_deadlines,
                                          context=outside_sessions())

    def _sweep_deadlines(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for session in list(self.sessions):  # a timed-out session may leave the set
            session.check_deadline(now)
        if self.sessions:
            self.watch_deadlines()

    async def bounce(
        self, session: Session, envelope: Envelope, failed: list[RecipientResult], spool_path: str
    ) -> Report:
        """Send an RFC 3464 report for ``failed`` to the sender.

        mailgate has no queue, so the report is delivered now, through the same router
        (a local sender's mailbox, or the relay for a remote one): SENT when it is
        durable (or the sender asked not to hear, NOTIFY=NEVER), DEFER when it failed
        for now, IMPOSSIBLE when no retry can change it (the null sender, never to be
        bounced to, or a report refused for good).
        """
        # (asked first: a failure nobody is to hear of needs no report, whoever sent it)
        reportable = bounce_recipients(failed)
        if not reportable:
            return Report.SENT  # NOTIFY=NEVER: the sender asked not to hear of failures
        report_envelope = bounce_envelope(envelope)
        if report_envelope is None:
            return Report.IMPOSSIBLE  # the null sender: never bounce a bounce
        try:
            returned, whole = await read_returned(spool_path, envelope)
        except OSError:
            return Report.DEFER
        return await self._report(
            session, envelope, report_envelope, reportable, returned, whole=whole
        )

    async def notify_success(
        self, session: Session, envelope: Envelope, results: list[RecipientResult],
        spool: SpoolReader,
    ) -> None:
        """NOTIFY=SUCCESS (RFC 3461 5.2.2): a report to the sender for the recipients
        that asked and whose copy nobody further on reports.  The message itself is
        delivered already: a report that cannot be sent is logged, nothing more (a 4xx
        now would only make the client send the message twice)."""
        reportable = success_recipients(results)
        if not reportable:  # the usual case: nobody asked
            return
        report_envelope = bounce_envelope(envelope)
        if report_envelope is None:
            return
        try:
            headers = header_section(spool.read_head(HEADER_LIMIT))
        except OSError as exc:
            session.log_event("dsn", level="error", id=session.message_id, error=str(exc)[:200])
            return
        await self._report(session, envelope, report_envelope, reportable, headers, success=True)

    async def _report(
        self, session: Session, envelope: Envelope, report_envelope: Envelope,
        reportable: list[RecipientResult], headers: bytes, success: bool = False,
        whole: bool = False,
    ) -> Report:
        """Build the report and deliver it now (no queue); as :meth:`bounce`."""
        spool = None
        try:
            report = build_dsn(
                envelope=envelope, failed=reportable, reporting_mta=self.hostname,
                original_headers=headers, whole_message=whole, success=success,
                arrival=session.message_arrival,
            )
            report_envelope = for_report(report_envelope, report)
            spool = self.spool.create(f"{session.message_id}.dsn")
            spool.write(report)
            spool.close()
        except OSError as exc:
            if spool is not None:
                spool.discard()
            session.log_event("dsn", level="error", id=session.message_id, error=str(exc)[:200])
            return Report.DEFER
        trace = TraceInfo(
            session_id=f"{session.message_id}.dsn", helo=self.hostname, client_ip="127.0.0.1",
            reverse_name="localhost", hostname=self.hostname, protocol="ESMTP",
        )
        try:
            results = await self.delivery.deliver(report_envelope, trace, spool)
        finally:
            spool.discard()
        recipients = ",".join(str(r.recipient.address) for r in reportable)
        # a report that could not go says why, where an operator looks for it
        refused = next((r.reply for r in results if not r.ok), None)
        why = {} if refused is None else {
            "level": "warning", "status": refused.enhanced or "",
            "reply": " / ".join(refused.lines)[:300],
        }
        session.log_event(
            "dsn", id=session.message_id, to=str(envelope.sender),
            **{"delivered" if success else "failed": recipients},
            code=(refused or results[0].reply).code if results else 0, **why,
        )
        if results and all(r.ok for r in results):
            return Report.SENT
        if not results or any(r.reply.code < 500 for r in results if not r.ok):
            return Report.DEFER
        return Report.IMPOSSIBLE


def with_normalize(settings: Settings) -> Settings:
    return replace(settings, normalize_bare_lf=True)
