"""The client side of SMTP and LMTP that the LMTP and smarthost destinations share.

Only what mailgate needs to hand a spooled message on: replies, EHLO/LHLO
extensions, STARTTLS, one (optionally pipelined, RFC 2920) MAIL/RCPT exchange and
the dot-stuffed data streamed from the spool file.  Every network failure, timeout or
malformed reply becomes :class:`ClientError`, so callers handle one exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailgate.delivery.base import RecipientResult, SpoolReader
from mailgate.delivery.binary import file_holds_8bit, file_holds_binary
from mailgate.delivery.dotstuff import CanonicalLines, DotStuffer, spool_chunks
from mailgate.delivery.handoff import may_send_data
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.headers import header_end
from mailgate.protocol.idn import ascii_domain
from mailgate.protocol.replies import Reply, multiline, reply

LINE_LIMIT = 4096  # a reply line; RFC 5321 says 512, leave room for sloppy servers
MAX_REPLY_LINES = 200  # a longer multi-line reply is a broken or hostile server

# RFC 5321 4.2: Reply-code [ SP textstring ] CRLF, so a bare "250" is a last line too
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*?))?\r?\n\Z", re.S)
# a domain or an address literal, as a greeting's first word should be
_MTA_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[(?:IPv6:)?[0-9A-Fa-f:.]{2,60}\]"
)


class ClientError(Exception):
    """The connection failed, timed out or the server spoke no SMTP."""


class WriteError(ClientError):
    """What we sent could not be written (the server closed, or stopped reading)."""


@dataclass(frozen=True, slots=True)
class Response:
    """One reply of the downstream server."""

    code: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def summary(self) -> str:
        """The first line as received, for a preface line or a log."""
        return f"{self.code} {self.lines[0] if self.lines else ''}".rstrip()

    def whole(self) -> str:
        """Every line, joined by spaces (a report's Diagnostic-Code)."""
        return f"{self.code} {' '.join(self.lines)}".rstrip()


def parse_reply(data: bytes) -> Response | None:
    """The first whole reply in ``data`` (lines as read_response takes them), or
    None where there is none."""
    lines: list[tuple[bytes, str]] = []
    for raw in data.splitlines(keepends=True)[:MAX_REPLY_LINES]:
        m = _REPLY_LINE.match(raw)
        if m is None:
            return None
        lines.append((m[1], (m[3] or b"").decode("utf-8", "replace")))
        if m[2] != b"-":
            return _response(lines)
    return None


def _response(lines: list[tuple[bytes, str]]) -> Response:
    """The reply of these (code, text) lines: the last line's code decides (RFC 5321
    4.2.1: every line MUST have it), and the text is only of lines that have it, or a
    reply and a log would quote what the server never said."""
    code = lines[-1][0]
    return Response(int(code), tuple(text for c, text in lines if c == code))


@dataclass(slots=True)
class Outcomes:
    """What became of each recipient (by index) of one hand-off: our reply, and the
    downstream's own where it gave the verdict (see RecipientResult)."""

    final: dict[int, Reply] = field(default_factory=dict)
    said: dict[int, Response] = field(default_factory=dict)

    def set(self, indexes: Iterable[int], answer: Reply, resp: Response | None = None) -> None:
        for i in indexes:
            self.final[i] = answer
            if resp is not None:
                self.said[i] = resp

    def results(
        self, recipients: list[Recipient], fallback: Reply, action: str, peer: str
    ) -> list[RecipientResult]:
        results = []
        for i, rcpt in enumerate(recipients):
            resp = self.said.get(i)
            results.append(
                RecipientResult(rcpt, self.final.get(i, fallback), action)
                if resp is None
                else RecipientResult(rcpt, self.final[i], action, peer, resp.whole())
            )
        return results


def path(address: Address | None) -> str:
    """``<address>`` for MAIL/RCPT; None and the null address give ``<>``."""
    return f"<{address}>" if address is not None else "<>"


def xtext(value: str) -> str:
    """RFC 3461 4.2 xtext encoding, for ENVID and ORCPT."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in value
    )


def utf8_addr_xtext(value: str) -> str:
    """RFC 6533 3 utf-8-addr-xtext: a utf-8 ORCPT's 7-bit form, each non-ASCII
    character as ``\\x{HEX}`` (the value is checked on input: no "+", "=", lone "\\")."""
    if value.isascii():
        return value
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in value)


# Seconds to wait for the reply to the end of the data: well within the 10 minutes
# our own client waits for ours.
FINAL_REPLY_TIMEOUT = 300.0
EARLY_REPLY_WAIT = 1.0  # seconds for the reply of a server that stopped us mid-message


async def hold_back_if_deferred(outcomes: Outcomes, accepted: list[int]) -> bool:
    """Whether to send no data because a recipient was refused for now at RCPT, here
    or by another hand-off of the message (delivery.handoff): the client is then
    answered 4xx for the whole message and sends it again, so the accepted recipients
    would get it twice; they are held back with it instead."""
    deferred = any(r.code < 500 for r in outcomes.final.values())
    if await may_send_data(deferred):
        return False
    outcomes.set(accepted, reply("delivery.held_back"))
    return True


class Connection:
    """One connection to an SMTP or LMTP server."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> parameters
        self.tls = False
        self.peer = ""  # the name the server gives in its greeting, if it looks like one

    @classmethod
    async def open(cls, address: str, timeout: float) -> Connection:
        """Connect to ``host:port``, ``[v6]:port`` or ``unix:/path`` and read the greeting."""
        try:
            async with asyncio.timeout(timeout):
                if address.startswith("unix:"):
                    reader, writer = await asyncio.open_unix_connection(
                        address[5:], limit=LINE_LIMIT
                    )
                else:
                    host, port = split_host_port(address)
                    reader, writer = await asyncio.open_connection(host, port, limit=LINE_LIMIT)
        except (OSError, TimeoutError, ValueError) as e:
            raise ClientError(f"cannot connect to {address}: {str(e) or type(e).__name__}") from e
        conn = cls(reader, writer, timeout)
        greeting = await conn.read_response(to="the connection (the greeting)")
        if greeting.code != 220:
            conn.abort()
            raise ClientError(f"greeting from {address}: {greeting.summary()}")
        # RFC 5321 4.3.1: the greeting starts with the server's domain or address
        # literal; a report names it as the Remote-MTA (RFC 3464 "dns" type)
        name = greeting.lines[0].split(" ", 1)[0] if greeting.lines else ""
        if _MTA_NAME.fullmatch(name):
            conn.peer = name
        return conn

    def supports(self, keyword: str) -> bool:
        return keyword in self.extensions

    async def read_response(self, final: bool = False, to: str = "") -> Response:
        """The next reply, to ``to`` (a command's name, for the error that says which
        reply did not come); ``final``: the one to the end of the data, which a server
        may take minutes to give (RFC 5321 4.5.3.2.6 has clients wait 10): given up
        after the command timeout, the message was often queued all the same, and
        the client's retry made a second copy."""
        to = "the end of the data" if final else to
        lines: list[tuple[bytes, str]] = []
        try:
            async with asyncio.timeout(max(self.timeout, FINAL_REPLY_TIMEOUT) if final
                                       else self.timeout):
                while len(lines) < MAX_REPLY_LINES:
                    raw = await self._reader.readline()
                    if not raw:
                        raise ClientError("connection closed by the server")
                    m = _REPLY_LINE.match(raw)
                    if m is None:
                        raise ClientError(f"bad reply line {raw[:80]!r}")
                    lines.append((m[1], (m[3] or b"").decode("utf-8", "replace")))
                    if m[2] != b"-":
                        return _response(lines)
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as e:
            # (which one matters: only a reply to the end of the data not read can
            # mean the server has the message all the same)
            raise ClientError(f"reading the reply{' to ' + to if to else ''}: "
                              f"{str(e) or type(e).__name__}") from e
        raise ClientError("reply has too many lines")

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
        # (uvloop raises RuntimeError for a transport the server has closed)
        except (OSError, TimeoutError, RuntimeError) as e:
            raise WriteError(f"writing: {str(e) or type(e).__name__}") from e

    @staticmethod
    def encode(line: str) -> bytes:
        # An address never carries CR or LF past the parser, but a command line with
        # one would let a value inject a command downstream: refuse it here as well.
        if "\r" in line or "\n" in line:
            raise ClientError("command contains a line break")
        return line.encode("utf-8") + b"\r\n"

    async def command(self, line: str) -> Response:
        await self.write(self.encode(line))
        return await self.read_response(to=line.split(" ", 1)[0].upper())

    async def hello(self, verb: str, name: str) -> Response:
        """EHLO or LHLO; on success the advertised extensions are in :attr:`extensions`."""
        resp = await self.command(f"{verb} {name}")
        if resp.ok:
            self.extensions = {}
            for line in resp.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
        return resp

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        # Bytes the server sent in plain text after its 220 would be read as replies
        # inside TLS: a man in the middle could answer our MAIL, RCPT and DATA for the
        # real server (a 250 for a message it never took; the CVE-2021-38371 class).
        # StreamReader has no public way to ask, hence its buffer.
        if len(getattr(self._reader, "_buffer", b"")):
            raise ClientError("the server sent more after its 220 to STARTTLS (injection?)")
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.start_tls(context, server_hostname=server_hostname)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise ClientError(f"TLS handshake: {str(e) or type(e).__name__}") from e
        self.extensions = {}  # RFC 3207 4.2: forget everything learnt before TLS
        self.tls = True

    async def transaction(
        self, mail_line: str, rcpt_lines: list[str]
    ) -> tuple[Response, list[Response]]:
        """MAIL then one RCPT per line, pipelined when the server offers PIPELINING."""
        if self.supports("PIPELINING"):
            await self.write(b"".join(self.encode(x) for x in [mail_line, *rcpt_lines]))
            mail = await self.read_response(to="MAIL")
            return mail, [await self.read_response(to="RCPT") for _ in rcpt_lines]
        mail = await self.command(mail_line)
        if not mail.ok:
            return mail, []
        return mail, [await self.command(line) for line in rcpt_lines]

    async def _send_data(self, spool_path: str, canonical: bool) -> None:
        """The message after a 354, dot-stuffed, and the final ``.CRLF``.

        ``canonical``: every CR and LF of the message is a CRLF's (it came by DATA);
        otherwise bare ones are made CRLF on the way (:class:`CanonicalLines`).
        """
        stuffer = DotStuffer()
        lines = None if canonical else CanonicalLines()
        try:
            async for chunk in spool_chunks(spool_path):
                await self.write(stuffer.feed(lines.feed(chunk) if lines else chunk))
        except OSError as e:
            raise ClientError(f"reading the spool: {e}") from e
        tail = stuffer.feed(lines.finish()) if lines else b""
        await self.write(tail + stuffer.finish())

    async def send_message(self, envelope: Envelope, spool: SpoolReader) -> Response | None:
        """The message, once the server took a recipient: by one BDAT LAST where it
        goes as BINARYMIME (:func:`sends_binary`), else DATA and the dot-stuffed data.
        The server's refusal of DATA, or None once all is sent (the caller reads the
        reply: LMTP gives one per accepted recipient, after BDAT LAST too)."""
        try:
            if sends_binary(self, envelope):
                await self._send_bdat(spool.path)
                return None
            data = await self.command("DATA")
            if data.code != 354:
                return data
            await self._send_data(spool.path, spool.no_bare_cr)
        except WriteError:
            # A server that refuses a message in the middle of it (too big, say)
            # may answer and close before the rest is sent: its answer, if it gave
            # one, is the outcome (a 554 passed on as 451 comes back for days).
            early = await self._early_reply()
            if early is None:
                raise
            return early
        return None

    async def _early_reply(self) -> Response | None:
        """A refusal the server sent before it closed, or None.  Read from the
        reader's buffer, as start_tls looks there: a server that closes with our
        data unread resets the connection, and StreamReader then raises the reset
        rather than hand out what it had already received."""
        try:
            async with asyncio.timeout(EARLY_REPLY_WAIT):
                while not getattr(self._reader, "_buffer", b"") and not self._reader.at_eof() \
                        and self._reader.exception() is None:
                    await asyncio.sleep(0.01)  # (the reply may still be on its way)
        except TimeoutError:
            return None
        resp = parse_reply(bytes(getattr(self._reader, "_buffer", b"")))
        return resp if resp is not None and resp.code >= 400 else None

    async def _send_bdat(self, spool_path: str) -> None:
        """The message as one ``BDAT size LAST`` chunk, its octets as they are
        (BINARYMIME: no dot-stuffing, no line ends to mend); the caller reads the
        reply (LMTP: one per accepted recipient)."""
        try:
            size = await asyncio.to_thread(os.path.getsize, spool_path)
            await self.write(f"BDAT {size} LAST\r\n".encode())
            async for chunk in spool_chunks(spool_path):
                await self.write(chunk)
        except OSError as e:
            raise ClientError(f"reading the spool: {e}") from e

    async def quit(self) -> None:
        """QUIT politely and close; failures do not matter any more."""
        with contextlib.suppress(ClientError):
            await self.command("QUIT")
        self.abort()

    def abort(self) -> None:
        self._writer.close()

    @property
    def closing(self) -> bool:
        return self._writer.is_closing() or self._reader.at_eof()


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; raises ValueError on anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


async def declared_size(conn: Connection, envelope: Envelope, spool: SpoolReader) -> int:
    """SIZE= for this message (RFC 1870 3: the octets sent after DATA, CRLF pairs
    included, the transparency dots not): the spool's size, but for data taken by
    BDAT that goes as text lines, whose bare line ends are mended on the way and
    which gets a final CRLF if it lacks one: counted by a pass over it then."""
    if spool.no_bare_cr or sends_binary(conn, envelope) or not conn.supports("SIZE"):
        return spool.size
    lines = CanonicalLines()
    total, last = 0, b""
    try:
        async for chunk in spool_chunks(spool.path):
            out = lines.feed(chunk)
            total, last = total + len(out), (last + out)[-2:]
    except OSError as e:
        raise ClientError(f"reading the spool: {e}") from e
    out = lines.finish()
    total, last = total + len(out), (last + out)[-2:]
    return total if last == b"\r\n" else total + 2


def transaction_commands(
    conn: Connection, envelope: Envelope, size: int, recipients: list[Recipient]
) -> tuple[str, list[str]]:
    """MAIL FROM and one RCPT TO per recipient, with the parameters the envelope needs
    and the server offers.

    A parameter the server does not offer is left out rather than failing here: a
    server that cannot take the message then refuses it with its own reply.  An
    address in a domain written in U-labels (a local domain may be configured so)
    needs SMTPUTF8; a server without it gets the domain in A-labels, the same domain.
    """
    utf8 = conn.supports("SMTPUTF8") and (
        envelope.smtputf8
        or not all(str(a).isascii() for a in (envelope.sender, *(r.address for r in recipients)))
    )
    params = []
    if sends_binary(conn, envelope):
        params.append("BODY=BINARYMIME")
    elif envelope.body in ("8BITMIME", "BINARYMIME") and conn.supports("8BITMIME"):
        params.append("BODY=8BITMIME")  # BINARYMIME as text lines: see content_refusal
    if utf8:
        params.append("SMTPUTF8")
    if conn.supports("SIZE"):
        params.append(f"SIZE={size}")
    if conn.supports("DSN"):
        params += [f"RET={envelope.ret}"] if envelope.ret else []
        params += [f"ENVID={xtext(envelope.envid)}"] if envelope.envid else []
    mail = " ".join([f"MAIL FROM:{wire_path(envelope.sender, utf8)}", *params])
    return mail, [_rcpt_command(conn, r, utf8) for r in recipients]


def _rcpt_command(conn: Connection, recipient: Recipient, utf8: bool) -> str:
    """RCPT TO, passing the DSN parameters on when the server offers DSN."""
    params = []
    if conn.supports("DSN"):
        if recipient.notify:
            params.append("NOTIFY=" + ",".join(recipient.notify))
        if recipient.orcpt:
            kind, sep, value = recipient.orcpt.partition(";")
            if sep and kind.lower() == "utf-8":
                # RFC 6533 3: no xtext here; raw UTF-8 only in an SMTPUTF8 transaction
                params.append(f"ORCPT={kind};{value if utf8 else utf8_addr_xtext(value)}")
            elif sep:
                params.append(f"ORCPT={kind};{xtext(value)}")
    return " ".join([f"RCPT TO:{wire_path(recipient.address, utf8)}", *params])


def sends_binary(conn: Connection, envelope: Envelope) -> bool:
    """Whether the message goes as BINARYMIME, by BDAT (RFC 3030 3): one that was
    received so, to a server that offers both."""
    return (
        envelope.body == "BINARYMIME"
        and conn.supports("BINARYMIME")
        and conn.supports("CHUNKING")
    )


async def content_refusal(conn: Connection, envelope: Envelope, path: str) -> Reply | None:
    """Why the message cannot go to this server as it is, or None: a BINARYMIME one
    holding binary data to a server that cannot take it so, which DATA would change
    (RFC 3030 3: a server that accepted binary data MUST pass on every bit of each
    octet), or 8-bit data to one without 8BITMIME (eight_bit_refusal); 554 5.6.3.
    The checks read the message, in a worker thread."""
    if envelope.body != "BINARYMIME" or sends_binary(conn, envelope):
        return await eight_bit_refusal(conn, envelope, path)
    try:
        binary = await asyncio.to_thread(file_holds_binary, path)
    except OSError as e:
        raise ClientError(f"reading the spool: {e}") from e
    if binary:
        return reply("delivery.binary_unsupported")
    return await eight_bit_refusal(conn, envelope, path)


async def eight_bit_refusal(conn: Connection, envelope: Envelope, path: str) -> Reply | None:
    """For 8BITMIME (or text-only BINARYMIME) content to a server without 8BITMIME:
    554 5.6.3 if it holds 8-bit octets (RFC 5321 2.4, RFC 6152 3: a client that has
    not negotiated it MUST NOT send them; there is no conversion here), else None.
    A message its client declared 7BIT goes as it came."""
    if envelope.body == "7BIT" or conn.supports("8BITMIME"):
        return None
    try:
        eight_bit = await asyncio.to_thread(file_holds_8bit, path)
    except OSError as e:
        raise ClientError(f"reading the spool: {e}") from e
    return reply("delivery.8bit_unsupported") if eight_bit else None


UTF8_HEAD_LIMIT = 64 * 1024  # how much of a header section is looked at for UTF-8


def utf8_refusal(
    envelope: Envelope, recipients: list[Recipient], spool: SpoolReader
) -> Reply | None:
    """For a server without SMTPUTF8: why the message cannot go to it (RFC 6531 3.2),
    or None.  Only a message its client sent with SMTPUTF8 is held to that: of one,
    a non-ASCII local part has no ASCII form (a domain has: A-labels), and neither
    have UTF-8 header fields; without them it goes as any other.  A message sent
    without SMTPUTF8 goes as it came, raw 8-bit header fields and all, as from any
    MTA before SMTPUTF8; 8-bit body text is 8BITMIME's business."""
    if not envelope.smtputf8:
        return None
    addresses = (envelope.sender, *(r.address for r in recipients))
    if any(a is not None and not a.local.isascii() for a in addresses):
        return reply("delivery.utf8_address_unsupported")
    head = spool.read_head(UTF8_HEAD_LIMIT)
    end = header_end(head)
    if not (head if end < 0 else head[:end]).isascii():
        return reply("delivery.utf8_header_unsupported")
    return None


def wire_path(address: Address | None, utf8: bool) -> str:
    """:func:`path` for a session with (``utf8``) or without SMTPUTF8: without it, a
    domain in U-labels goes in A-labels.  A non-ASCII local part has no such other
    form; the server refuses it with its own reply."""
    if address is None or utf8 or address.domain.isascii():
        return path(address)
    return path(Address(address.local, ascii_domain(address.domain), address.quoted))


def downstream_said(resp: Response) -> list[str]:
    """The downstream's first reply line, as a preface line of our own reply."""
    return [f"downstream said: {resp.summary()}"]


def with_downstream_status(ours: Reply, resp: Response) -> Reply:
    """Our reply with the downstream's enhanced status where it gave one of the same
    class: 5.2.2 "mailbox full" must not become 5.1.1 "no such user" (a mailing
    list would unsubscribe the recipient), nor 4.2.2 a generic 4.4.0."""
    first = resp.lines[0].split(" ", 1)[0] if resp.lines else ""
    return ours.with_status(first) if first[:1] == str(ours.code)[0] else ours


def recipient_failure(recipient: Recipient, resp: Response) -> Reply:
    """A downstream's refusal of one recipient, as our per-recipient reply."""
    name = "delivery.downstream_rcpt_perm" if resp.permanent else "delivery.downstream_rcpt_temp"
    return with_downstream_status(
        multiline(name, downstream_said(resp), address=recipient.address), resp
    )
