"""Issue 8.2: random input never breaks the engine, and how the bytes are split
between reads never changes what it answers or reports."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import Session, lines, well_formed

from mailgate.protocol import events as ev
from mailgate.protocol.connection import Connection, Settings
from mailgate.protocol.replies import reply

# CI keeps this modest; MAILGATE_FUZZ_EXAMPLES=20000 for a deeper run by hand.
FUZZ = settings(
    max_examples=int(os.environ.get("MAILGATE_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Pieces of SMTP sessions, well-formed and not, so random joins reach every state.
TOKENS = [
    b"EHLO a.example\r\n", b"HELO b.example\r\n", b"EHLO [IPv6:::1]\r\n",
    b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
    b"MAIL FROM:<j\xc3\xb6@b.example> SMTPUTF8 RET=HDRS ENVID=x+2B\r\n",
    b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", b"MAIL FROM:<a@b.example> SIZE=99999\r\n",
    b"RCPT TO:<c@d.example>\r\n", b"RCPT TO:<xno@d.example>\r\n",
    b"RCPT TO:<c@d.example> NOTIFY=SUCCESS ORCPT=rfc822;c+40d\r\n", b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 2 X\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"HELP\r\n", b"VRFY a\r\n", b"EXPN a\r\n", b"TURN\r\n",
    b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN =\r\n", b"AUTH PLAIN AGEAYg==\r\n",
    b"AUTH X\r\n", b"*\r\n", b"am9l\r\n", b"QUIT\r\n",
    b"..x\r\n", b"hello world", b"\x00", b"\xff\xfe", b"x" * 600, b"MAIL FROM:<" + b"m" * 2100,
]


# Line ends and dots, real and fake (the SMTP smuggling forms), as their own branch so
# that they turn up often inside message data.
LINE_ENDS = [
    b"\r\n", b"\n", b"\r", b".", b"x", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\n.\r\n",
    b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n",
]

SETUP = b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
# Random tokens rarely line up a transaction on their own; start most streams in one,
# in the body of a message, or between BDAT chunks.
PREAMBLES = [b"", SETUP, SETUP + b"DATA\r\n", SETUP + b"DATA\r\nab", SETUP + b"BDAT 9\r\n"]


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    token = st.sampled_from(TOKENS) | st.sampled_from(LINE_ENDS) | st.binary(max_size=12)
    parts = draw(st.lists(token, min_size=1, max_size=40))
    return draw(st.sampled_from(PREAMBLES)) + b"".join(parts)


@st.composite
def cut_points(draw: st.DrawFn, length: int) -> list[int]:
    cuts = draw(st.lists(st.integers(0, length), max_size=12))
    return sorted(set(cuts))


def decide(conn: Connection, event: ev.Event) -> None:
    """A deterministic server that says no sometimes but never clears the input
    buffer (no TLS handshake, no AUTH success), so splits must not matter."""
    if isinstance(event, ev.RcptTo) and event.recipient.address.local.startswith("x"):
        conn.reject(reply("rcpt.unknown", address=str(event.recipient.address)))
    elif isinstance(event, ev.AuthStart):
        conn.auth_challenge(b"go on")
    elif isinstance(event, ev.AuthResponse):
        conn.auth_failure(reply("auth.failed"))
    elif isinstance(event, ev.StartTLS):
        conn.reject(reply("starttls.unavailable"))
    else:
        conn.accept()


def engine_settings(normalize: bool) -> Settings:
    return Settings(
        "mx.example.org",
        max_message_size=64,
        max_recipients=3,
        max_errors=25,
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        allow_plaintext_auth=True,
        vrfy=True,
        normalize_bare_lf=normalize,
    )


def run(stream: bytes, cuts: list[int], normalize: bool) -> tuple[bytes, list[object]]:
    s = Session(engine_settings(normalize), decide=decide)
    out = b""
    start = 0
    for cut in [*cuts, len(stream)]:
        out += s.feed(stream[start:cut])
        start = cut
    well_formed(s.greeting)
    well_formed(out)
    return out, normalise(s.events)


def normalise(events: list[ev.Event]) -> list[object]:
    """Body slices joined per message; the body of an aborted message dropped (how
    much of it was passed on before the abort depends on the reads)."""
    out: list[object] = []
    body = b""
    for e in events:
        if isinstance(e, ev.BodyChunk):
            body += e.data
            continue
        if isinstance(e, ev.MessageEnd):
            out.append(("body", body))
        body = b""
        out.append(e)
    return out


@FUZZ
@given(data=st.data(), normalize=st.booleans())
def test_split_does_not_change_replies_or_events(data: st.DataObject, normalize: bool) -> None:
    stream = data.draw(streams())
    cuts = data.draw(cut_points(len(stream)))
    whole_out, whole_events = run(stream, [], normalize)
    split_out, split_events = run(stream, cuts, normalize)
    assert split_out == whole_out
    assert split_events == whole_events


@FUZZ
@given(stream=streams(), normalize=st.booleans())
def test_byte_at_a_time_equals_all_at_once(stream: bytes, normalize: bool) -> None:
    assert run(stream, list(range(1, len(stream))), normalize) == run(stream, [], normalize)


@FUZZ
@given(raw=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_raw_bytes_never_raise(raw: bytes, cuts: list[int]) -> None:
    # Also from inside a message, where the body reader sees the junk.
    for prefix in (b"", b"EHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<c@d.e>\r\nDATA\r\n",
                   b"EHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<c@d.e>\r\nBDAT 100\r\n"):
        stream = prefix + raw
        run(stream, sorted({c for c in cuts if c <= len(stream)}), normalize=False)


COMMAND_LINES = [
    "EHLO a.example", "HELO b.example", "MAIL FROM:<a@b.example>", "MAIL FROM:<bad",
    "RCPT TO:<c@d.example>", "RCPT TO:<xno@d.example>", "RSET", "NOOP", "HELP", "VRFY c",
    "EXPN c", "TURN", "STARTTLS x", "AUTH", "MAIL FROM:<a@b.example> FOO=1", "",
    "RCPT TO:<c@d.example> NOTIFY=BAD", "BDAT x", "DATA x", "x" * 700,
]


def one_plain_line(text: str) -> bool:
    """No line end, and not a verb that switches to reading data, AUTH lines or quits."""
    return "\n" not in text and "\r" not in text and text[:4].upper() not in (
        "DATA", "BDAT", "AUTH", "QUIT"
    )


@FUZZ
@given(
    commands=st.lists(
        st.sampled_from(COMMAND_LINES) | st.text(max_size=30).filter(one_plain_line),
        min_size=1,
        max_size=30,
    )
)
def test_every_pipelined_command_gets_exactly_one_reply_in_order(commands: list[str]) -> None:
    settings_ = Settings("mx.example.org", max_errors=1000, max_recipients=3)
    s = Session(settings_, decide=decide)
    out = s.feed("".join(c + "\r\n" for c in commands).encode("utf-8", "surrogatepass"))
    well_formed(out)
    finals = [line for line in lines(out) if line[3:4] == " "]
    if s.conn.closed:
        assert len(finals) <= len(commands)
    else:
        assert len(finals) == len(commands)
