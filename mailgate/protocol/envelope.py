"""Addresses and the envelope of one mail transaction, as the engine hands them on."""

from __future__ import annotations

from dataclasses import dataclass, field


# Immutable by contract, not frozen: see mailgate.protocol.events (two per message).
@dataclass(slots=True, unsafe_hash=True)
class Address:
    """A mailbox from a MAIL or RCPT path.

    ``local`` is the local part as the client wrote it, without surrounding quotes but
    with quoted-pair escapes removed; ``quoted`` records that it was a quoted string.
    ``domain`` is a domain name or an address literal in brackets (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``, or ``[]`` for the upas loopback form).  A source route
    (RFC 5321 Appendix C) is accepted by the grammar and dropped here.
    An empty ``local`` and ``domain`` is the null reverse-path ``<>``; ``postmaster``
    without a domain is the RFC 5321 special ``<Postmaster>`` recipient.
    """

    local: str
    domain: str
    quoted: bool = False
    # str(self), made on first use: an address is printed for its reply, its log lines
    # and its headers, seven times per message on the bench's loads.
    _text: str | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def domain_lower(self) -> str:
        return self.domain.lower()

    def __str__(self) -> str:
        text = self._text
        if text is None:
            local = self.local
            if self.quoted:
                local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
            text = self._text = f"{local}@{self.domain}" if self.domain else local
        return text


NULL_ADDRESS = Address("", "")


@dataclass(slots=True)
class Recipient:
    """An accepted RCPT with its DSN parameters (RFC 3461)."""

    address: Address
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(slots=True)
class Envelope:
    """One mail transaction as far as the engine knows it."""

    helo: str = ""
    extended: bool = False
    sender: Address | None = None
    body: str = "7BIT"  # 7BIT, 8BITMIME or BINARYMIME
    smtputf8: bool = False
    declared_size: int | None = None
    ret: str | None = None  # DSN RET=FULL|HDRS
    envid: str | None = None  # DSN ENVID, decoded from xtext
    auth: str | None = None  # MAIL ... AUTH= (RFC 4954 section 5), decoded from xtext
    recipients: list[Recipient] = field(default_factory=list)
    chunked: bool = False  # the body arrived by BDAT

    def copy(self) -> Envelope:
        """A shallow copy, as ``copy.copy`` makes it (the recipient list is shared),
        at a fifth of the cost: the engine takes one per message."""
        return Envelope(
            self.helo, self.extended, self.sender, self.body, self.smtputf8,
            self.declared_size, self.ret, self.envid, self.auth, self.recipients,
            self.chunked,
        )  # fmt: skip
