"""Drive the sans-I/O engine directly: bytes in, reply lines and events out.

A :class:`Session` plays the server's part with a *decider*: a function that answers
each decision event (accept, reject, AUTH steps).  ``accept_all`` accepts everything;
tests script refusals with :func:`scripted`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from mailgate.protocol import events as ev
from mailgate.protocol.connection import Connection, Settings
from mailgate.protocol.replies import Reply

HOST = "mx.example.org"
Decider = Callable[[Connection, ev.Event], None]

DECISIONS = (
    ev.Helo,
    ev.MailFrom,
    ev.RcptTo,
    ev.DataStart,
    ev.MessageEnd,
    ev.Verify,
    ev.StartTLS,
    ev.AuthStart,
    ev.AuthResponse,
)

# A reply line: three digits, "-" or " ", text; RFC 3463 enhanced code if any.
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\Z", re.S)
ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})\Z")


def accept_all(conn: Connection, event: ev.Event) -> None:
    """Say yes to everything; AUTH succeeds after at most one challenge."""
    if isinstance(event, ev.AuthStart):
        if event.initial is None:
            conn.auth_challenge(b"")
        else:
            conn.auth_success("user")
    elif isinstance(event, ev.AuthResponse):
        conn.auth_success("user")
    elif isinstance(event, ev.StartTLS):
        conn.accept()
        conn.tls_started()  # the handshake, as far as the engine is concerned
    else:
        conn.accept()


def scripted(**refusals: Reply | Decider) -> Decider:
    """accept_all, except for event classes named here (by class name): a Reply
    rejects with it, a function decides itself."""

    def decide(conn: Connection, event: ev.Event) -> None:
        rule = refusals.get(type(event).__name__)
        if rule is None:
            accept_all(conn, event)
        elif isinstance(rule, Reply):
            if isinstance(event, (ev.AuthStart, ev.AuthResponse)):
                conn.auth_failure(rule)
            else:
                conn.reject(rule)
        else:
            rule(conn, event)

    return decide


class Session:
    """One engine with a decider; :meth:`send` returns the reply lines it caused."""

    def __init__(
        self,
        settings: Settings | None = None,
        decide: Decider = accept_all,
        **overrides: object,
    ) -> None:
        if settings is None:
            settings = Settings(HOST, **overrides)  # type: ignore[arg-type]
        self.conn = Connection(settings)
        self.decide = decide
        self.events: list[ev.Event] = []
        self.writes: list[bytes] = []  # one entry per data_to_send() that had output
        self.conn.greet()
        self.greeting = self.conn.data_to_send()

    def feed(self, data: bytes | str) -> bytes:
        """Feed bytes, run the engine until it needs more, return one flush."""
        if isinstance(data, str):
            data = data.encode()
        self.conn.receive_data(data)
        sent = self.pump()
        out = self.conn.data_to_send()
        if out:
            self.writes.append(out)
        return b"".join(sent) + out

    def send(self, data: bytes | str) -> list[str]:
        return lines(self.feed(data))

    def pump(self) -> list[bytes]:
        """Run the engine until it needs data; the writes it asked for on the way
        (SEND_FIRST), as a driver sends them."""
        sent: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is ev.NEED_DATA:
                return sent
            if event is ev.SEND_FIRST:
                sent.append(self.conn.data_to_send())
                self.writes.append(sent[-1])
                continue
            assert event is not ev.PAUSED, "the decider left a decision open"
            assert isinstance(event, ev.Event)
            self.events.append(event)
            if isinstance(event, DECISIONS):
                self.decide(self.conn, event)

    def of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]

    def body(self) -> bytes:
        return b"".join(e.data for e in self.of(ev.BodyChunk))  # type: ignore[attr-defined]

    def ehlo(self, name: str = "client.example.net") -> list[str]:
        return self.send(f"EHLO {name}\r\n")

    def transaction(self, sender: str = "<a@example.net>", *rcpts: str) -> None:
        """EHLO (if needed), MAIL and RCPTs, each expected to be accepted."""
        if self.conn.helo is None:
            self.ehlo()
        assert self.send(f"MAIL FROM:{sender}\r\n")[0].startswith("250")
        for r in rcpts or ("<b@example.org>",):
            assert self.send(f"RCPT TO:{r}\r\n")[0].startswith("250"), r


def lines(out: bytes) -> list[str]:
    """Reply bytes -> text lines; asserts every line ends with CRLF."""
    if not out:
        return []
    assert out.endswith(b"\r\n"), out
    return [line.decode("utf-8") for line in out[:-2].split(b"\r\n")]


def codes(reply_lines: Iterable[str]) -> list[str]:
    """The code (and enhanced code, if any) of each final reply line: '250 2.1.0'."""
    out = []
    for line in reply_lines:
        if line[3:4] == " ":
            parts = line.split(" ")
            has_enhanced = len(parts) > 1 and ENHANCED.match(parts[1])
            out.append(f"{parts[0]} {parts[1]}" if has_enhanced else parts[0])
    return out


def well_formed(out: bytes) -> None:
    """Every reply line is 3 digits + separator + text, ends CRLF, fits 512 octets,
    and carries a class-matching enhanced code on every line unless the reply is a
    3xx, the greeting or the HELO/EHLO reply (RFC 2034)."""
    if not out:
        return
    assert out.endswith(b"\r\n"), out
    current: bytes | None = None  # the code of an unfinished multi-line reply
    exempt = False
    for raw in out[:-2].split(b"\r\n"):
        assert len(raw) + 2 <= 512, raw
        assert b"\r" not in raw and b"\n" not in raw, raw
        m = REPLY_LINE.match(raw)
        assert m, raw
        code, sep, text = m.group(1), m.group(2), m.group(3).decode("utf-8")
        if current is None:
            exempt = code[:1] == b"3" or _greeting_or_helo(code, text)
        else:
            assert code == current, (raw, current)
        current = code if sep == b"-" else None
        if not exempt:
            em = ENHANCED.match(text.split(" ", 1)[0])
            assert em, raw
            assert em.group(1) == chr(code[0]), raw
    assert current is None, "multi-line reply not finished"


def _greeting_or_helo(code: bytes, text: str) -> bool:
    return (code == b"220" and text.startswith(f"{HOST} ESMTP ")) or (
        code == b"250" and text.startswith(f"{HOST} you are ")
    )
