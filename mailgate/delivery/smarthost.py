"""Hand-off to a smarthost by SMTP: the outbound relay for authenticated users.

EHLO (HELO if EHLO is refused), then STARTTLS as ``starttls`` says:

``require``        (the default) STARTTLS must be offered and the certificate must
                   verify against ``cafile`` or the system's CAs for ``host``;
                   otherwise nothing is sent and every recipient gets 451 4.4.1;
``opportunistic``  STARTTLS when offered (a certificate that does not verify still
                   fails: a bad certificate is not "no TLS"), plain text otherwise;
``off``            never.

With ``username`` set, AUTH PLAIN with the password read from ``password_file``;
credentials are sent only inside TLS unless ``starttls = "off"`` says the link is
trusted.  Then MAIL, RCPT per recipient (pipelined when offered, DSN parameters
passed on when the smarthost offers DSN) and the dot-stuffed data.  A recipient
succeeds only once the smarthost answered 250 after the data.

Replies: a refused RCPT gives that recipient 550 5.1.1 / 451 4.4.0 with the
smarthost's line before ours; a refused MAIL or data gives every recipient 554
5.0.0 / 451 4.4.1 likewise; an unreachable smarthost, a TLS or AUTH failure, or a
timeout gives 451 4.4.1 to every recipient.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl

from mailgate.config.delivery import SmtpConfig
from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.smtp_client import (
    ClientError,
    Connection,
    Outcomes,
    Response,
    content_refusal,
    declared_size,
    downstream_said,
    hold_back_if_deferred,
    recipient_failure,
    transaction_commands,
    utf8_refusal,
    with_downstream_status,
)
from mailgate.delivery.spool import may_access
from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import Reply, multiline, reply

log = logging.getLogger(__name__)


class SmarthostDestination:
    """Relays through ``config.host``:``config.port``."""

    def __init__(self, config: SmtpConfig, hostname: str) -> None:
        """Raises ValueError when ``cafile`` cannot be loaded."""
        self._config = config
        self._hostname = hostname
        self._address = (
            f"[{config.host}]:{config.port}"
            if ":" in config.host
            else (f"{config.host}:{config.port}")
        )
        try:
            self._tls = ssl.create_default_context(cafile=config.cafile or None)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cafile: cannot load {config.cafile!r}: {e}") from e

    def problem(self, as_ids: tuple[int, int] | None = None) -> str | None:
        """Why the password file could not be read as this process (or the user and
        group ``as_ids``): it is read at each connection, after privileges are
        dropped, so root being able to read it (at start, in check-config) proved
        nothing and every message got 451.  Start-up, reloads and check-config warn."""
        path = self._config.password_file
        if not path:
            return None
        if not os.path.isfile(path):
            return f"{path} is not a file: every message relayed here is answered 451"
        if may_access(path, os.R_OK, as_ids):
            return None
        return (f"{path} is not readable by the server's user: every message relayed here "
                "is answered 451")

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        """One result per recipient; never raises."""
        if not recipients:
            return []
        outcomes = Outcomes()
        conn: Connection | None = None
        reports_itself = False  # took NOTIFY with the RCPT: its own DSNs, not ours
        try:
            conn = await Connection.open(self._address, self._config.timeout)
            await self._hello(conn)
            reports_itself = conn.supports("DSN")
            await self._authenticate(conn)
            await self._transfer(conn, envelope, spool, recipients, outcomes)
            await conn.quit()
        except ClientError as e:
            log.warning("%s: smarthost %s: %s", trace.session_id, self._address, e)
        except Exception:  # a bug must not lose the message: the client retries on 451
            log.exception("%s: smarthost %s failed", trace.session_id, self._address)
        finally:
            if conn is not None:
                conn.abort()
        action = "" if reports_itself else "relayed"
        peer = (conn.peer if conn is not None else "") or self._config.host
        return outcomes.results(recipients, reply("delivery.smarthost_temp"), action, peer)

    async def _hello(self, conn: Connection) -> None:
        """EHLO, and STARTTLS with a second EHLO as the configuration asks."""
        resp = await conn.hello("EHLO", self._hostname)
        if not resp.ok:
            resp = await conn.command(f"HELO {self._hostname}")
            if not resp.ok:
                raise ClientError(f"HELO refused: {resp.summary()}")
        mode = self._config.starttls
        if mode == "off" or (mode == "opportunistic" and not conn.supports("STARTTLS")):
            return
        if not conn.supports("STARTTLS"):
            raise ClientError("STARTTLS required but not offered")
        resp = await conn.command("STARTTLS")
        if resp.code != 220:
            raise ClientError(f"STARTTLS refused: {resp.summary()}")
        await conn.start_tls(self._tls, self._config.host)
        resp = await conn.hello("EHLO", self._hostname)
        if not resp.ok:
            raise ClientError(f"EHLO after STARTTLS refused: {resp.summary()}")

    async def _authenticate(self, conn: Connection) -> None:
        if not self._config.username:
            return
        if not conn.tls and self._config.starttls != "off":
            raise ClientError("not sending credentials without TLS")
        if "PLAIN" not in conn.extensions.get("AUTH", "").upper().split():
            raise ClientError("smarthost does not offer AUTH PLAIN")
        try:
            password = await asyncio.to_thread(_read_password, self._config.password_file)
        except OSError as e:
            raise ClientError(f"smtp.password_file: {e}") from e
        token = f"\0{self._config.username}\0{password}".encode()
        resp = await conn.command("AUTH PLAIN " + base64.b64encode(token).decode("ascii"))
        if resp.code != 235:
            raise ClientError(f"AUTH refused: {resp.summary()}")

    async def _transfer(
        self,
        conn: Connection,
        envelope: Envelope,
        spool: SpoolReader,
        recipients: list[Recipient],
        outcomes: Outcomes,
    ) -> None:
        """Runs the transaction, filling ``outcomes`` as replies come in."""
        everyone = range(len(recipients))
        refusal = None if conn.supports("SMTPUTF8") else utf8_refusal(envelope, recipients, spool)
        refusal = refusal or await content_refusal(conn, envelope, spool.path)
        if refusal is not None:
            outcomes.set(everyone, refusal)
            return
        mail, rcpts = await conn.transaction(
            *transaction_commands(conn, envelope, await declared_size(conn, envelope, spool),
                                  recipients)
        )
        if not mail.ok:
            outcomes.set(everyone, _whole_message_failure(mail), mail)
            return
        accepted = []
        for i, (recipient, resp) in enumerate(zip(recipients, rcpts, strict=True)):
            if resp.ok:
                accepted.append(i)
            else:
                outcomes.set((i,), recipient_failure(recipient, resp), resp)
        if not accepted or await hold_back_if_deferred(outcomes, accepted):
            return
        refused = await conn.send_message(envelope, spool)
        if refused is not None:
            outcomes.set(accepted, _whole_message_failure(refused), refused)
            return
        resp = await conn.read_response(final=True)
        if resp.ok:
            outcomes.set(accepted, reply("ok"), resp)  # (its words: the queue id)
        else:
            outcomes.set(accepted, _whole_message_failure(resp), resp)


def _read_password(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\r\n")


def _whole_message_failure(resp: Response) -> Reply:
    name = "delivery.smarthost_perm" if resp.permanent else "delivery.smarthost_temp"
    return with_downstream_status(multiline(name, downstream_said(resp)), resp)
