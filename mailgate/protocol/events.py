"""Events the engine hands to its driver.

Events marked *decision* pause the engine: it reads no further input until the
driver answers with ``accept()`` / ``reject()`` (or, for AUTH, ``auth_challenge()``,
``auth_success()``, ``auth_failure()``).  That is what keeps pipelining safe: nothing
after a command is acted on before that command's reply is decided.

Events are immutable by contract but not frozen dataclasses: a frozen dataclass's
``__init__`` sets each field through ``object.__setattr__``, roughly 0.3 µs a field,
and the engine makes one or two events per command.  ``unsafe_hash`` gives them the hash
a frozen dataclass would have.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply


class Event:
    __slots__ = ()


@dataclass(slots=True, unsafe_hash=True)
class Helo(Event):
    """HELO/EHLO (decision).  On accept the transaction is reset."""

    name: str
    extended: bool


@dataclass(slots=True, unsafe_hash=True)
class MailFrom(Event):
    """MAIL FROM (decision).  ``envelope`` is the prospective new transaction."""

    envelope: Envelope


@dataclass(slots=True, unsafe_hash=True)
class RcptTo(Event):
    """RCPT TO (decision).  ``envelope`` is the transaction so far."""

    recipient: Recipient
    envelope: Envelope


@dataclass(slots=True, unsafe_hash=True)
class DataStart(Event):
    """DATA, or the first BDAT of a transaction (decision: accept starts the body)."""

    envelope: Envelope
    chunked: bool


@dataclass(slots=True, unsafe_hash=True)
class BodyChunk(Event):
    """A slice of the message (unstuffed, CRLF line ends); store it as it comes."""

    data: bytes


@dataclass(slots=True, unsafe_hash=True)
class MessageEnd(Event):
    """The data is complete (decision: the driver answers with the delivery result)."""

    envelope: Envelope
    size: int


@dataclass(slots=True, unsafe_hash=True)
class MessageAborted(Event):
    """The message ends without its data complete; drop the spool.  Either the engine
    refused it (size, bare LF, a bad BDAT), or the client ``abandoned`` it between BDAT
    chunks with RSET, HELO/EHLO or STARTTLS, which RFC 3030 allows.

    The engine has already queued ``reply``: the refusal, or the answer to that command."""

    reply: Reply
    abandoned: bool = False


@dataclass(slots=True, unsafe_hash=True)
class Verify(Event):
    """VRFY when verification is enabled (decision)."""

    address: Address


@dataclass(slots=True, unsafe_hash=True)
class StartTLS(Event):
    """STARTTLS (decision).  On accept the engine queues 220 and discards buffered
    input; the driver flushes, runs the handshake and calls ``tls_started()``."""


@dataclass(slots=True, unsafe_hash=True)
class AuthStart(Event):
    """AUTH <mechanism> [initial-response] (decision via the auth_* methods).

    ``initial`` is the decoded initial response (b"" for ``=``), or None."""

    mechanism: str
    initial: bytes | None


@dataclass(slots=True, unsafe_hash=True)
class AuthResponse(Event):
    """A decoded client line in an AUTH exchange (decision via the auth_* methods)."""

    data: bytes


@dataclass(slots=True, unsafe_hash=True)
class AuthAborted(Event):
    """The client cancelled with ``*`` or sent bad base64; the engine replied."""

    reply: Reply


@dataclass(slots=True, unsafe_hash=True)
class Closed(Event):
    """The engine is done (QUIT, 421, 521): flush the output and close."""


@dataclass(slots=True, unsafe_hash=True)
class Rejected(Event):
    """The engine itself refused a command (syntax, sequence); for logs and counters."""

    command: str
    reply: Reply
    counted: bool = True  # towards max_errors (and the tarpit): the client's fault


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")  # a decision is pending
# Replies the engine gave alone piled up (a pipelined run of HELP, NOOP or BDAT chunks):
# send them (data_to_send) before asking for the next event.
SEND_FIRST = _Sentinel("SEND_FIRST")
