"""Command and reply injection over the wire.

* Commands pipelined behind STARTTLS (CVE-2011-0411 class) or behind a successful AUTH
  are never executed: they were sent before the client knew the outcome.
* No client value can put a CR, LF or other line-breaking character into a reply or into
  the stored trace headers, so no reply line or header field can be forged.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening.wire import (
    HELO,
    HOSTNAME,
    Reply,
    Wire,
    eager_tls_command,
    make_tls,
    make_users,
    start,
    stored_files,
    untrusted_config,
)
from tests.integration.server import RunningServer

PASSWORD = "correct horse battery"
MARK = b"INJECTED"
# A reply line that starts with the attacker's text would be a forged reply.
_FORGED = re.compile(rb"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3} )?" + MARK)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


@dataclass
class Secure:
    server: RunningServer
    tls: ssl.SSLContext


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    workdir = tmp_path_factory.mktemp("injection")
    context, tls = make_tls(workdir)
    auth = make_users(workdir / "users", "alice", PASSWORD)
    config = untrusted_config(workdir, tls + auth, server="max_errors = 1000")
    running = start(workdir, config)
    yield Secure(running, context)
    running.stop()


def _check(r: Reply) -> Reply:
    for line in r.lines:
        assert not _CONTROL.search(line), r
        assert not line.startswith(MARK), r
    return r


def _tls_session(s: Secure) -> Wire:
    wire = Wire(s.server)
    assert wire.cmd(f"EHLO {HELO}").code == 250
    assert wire.cmd("STARTTLS").code == 220
    wire.starttls(s.tls)
    assert wire.cmd(f"EHLO {HELO}").code == 250
    return wire


@pytest.mark.parametrize("before", ["", f"EHLO {HELO}\r\n"], ids=["after-ehlo", "with-ehlo"])
def test_commands_pipelined_behind_starttls_are_void(secure: Secure, before: str) -> None:
    wire = Wire(secure.server)
    if not before:
        assert wire.cmd(f"EHLO {HELO}").code == 250
    wire.send(
        f"{before}STARTTLS\r\nMAIL FROM:<evil@client.mailgate.org>\r\n"
        f"RCPT TO:<alice@{HOSTNAME}>\r\n".encode()
    )
    if before:
        assert wire.reply().code == 250
    assert wire.reply().code == 220
    # Nothing more in plaintext: the pipelined MAIL and RCPT got no answer at all.
    assert wire.available(0.3) == b""
    wire.starttls(secure.tls)
    assert wire.cmd(f"EHLO {HELO}").code == 250
    refused = wire.cmd(f"RCPT TO:<alice@{HOSTNAME}>")
    assert (refused.code, refused.lines[0][:5]) == (503, b"5.5.1"), refused
    assert wire.cmd("MAIL FROM:<good@client.mailgate.org>").code == 250
    assert wire.cmd(f"RCPT TO:<alice@{HOSTNAME}>").code == 250
    wire.close()


def test_commands_pipelined_behind_auth_plain_are_answered(secure: Secure) -> None:
    # RFC 4954 4: AUTH with an initial response that completes in one round trip
    # (PLAIN), no security layer, may be followed by more commands in the group; each
    # gets its reply (RFC 5321 4.2).  Only STARTTLS voids what was pipelined behind it.
    wire = _tls_session(secure)
    token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    wire.send(f"AUTH PLAIN {token}\r\nMAIL FROM:<alice@{HOSTNAME}>\r\n".encode())
    assert wire.reply().code == 235
    assert wire.reply().code == 250
    assert wire.cmd(f"RCPT TO:<alice@{HOSTNAME}>").code == 250
    wire.close()


def test_commands_pipelined_behind_auth_login_are_answered(secure: Secure) -> None:
    # A client that pipelines behind a multi-step mechanism breaks RFC 4954 4, but
    # no line goes unanswered: the exchange takes its lines, the commands follow.
    wire = _tls_session(secure)
    user, password = (base64.b64encode(v.encode()).decode() for v in ("alice", PASSWORD))
    wire.send(f"AUTH LOGIN\r\n{user}\r\n{password}\r\nMAIL FROM:<alice@{HOSTNAME}>\r\n"
              f"RCPT TO:<bob@{HOSTNAME}>\r\n".encode())
    assert [wire.reply().code for _ in range(5)] == [334, 334, 235, 250, 250]
    wire.close()


def test_a_failed_auth_does_not_authenticate_what_follows(secure: Secure) -> None:
    wire = _tls_session(secure)
    token = base64.b64encode(b"\0alice\0wrong").decode()
    wire.send(f"AUTH PLAIN {token}\r\nMAIL FROM:<alice@{HOSTNAME}>\r\n"
              f"RCPT TO:<someone@elsewhere.example.net>\r\n".encode())
    assert wire.reply().code == 535
    assert wire.reply().code == 250  # MAIL runs, but as the untrusted client it is
    assert wire.reply().code == 550  # so relaying is refused
    wire.close()


# Each: commands to reach the state, then one hostile line.  None of these may yield a
# reply line of the attacker's making, or a control character in any reply.
_EHLO = f"EHLO {HELO}".encode()
_MAIL = b"MAIL FROM:<a@client.mailgate.org>"
HOSTILE: list[tuple[list[bytes], bytes]] = [
    ([], b"HELO a\r" + MARK),
    ([], b"HELO a\r\n250 " + MARK),
    *(([], b"HELO a" + sep + MARK) for sep in (
        b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x00", b"\x1b[2K\r",
        b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")),
    ([], b"EHLO [IPv6:::1\x0b" + MARK + b"]"),
    ([_EHLO], b'MAIL FROM:<"a\r' + MARK + b'"@client.mailgate.org>'),
    ([_EHLO], b'MAIL FROM:<"a\\\r' + MARK + b'"@client.mailgate.org>'),
    ([_EHLO], b'MAIL FROM:<"a\xc2\x85' + MARK + b'"@client.mailgate.org> SMTPUTF8'),
    ([_EHLO], b'MAIL FROM:<"a\xe2\x80\xa8' + MARK + b'"@client.mailgate.org> SMTPUTF8'),
    ([_EHLO], b"MAIL FROM:<a@client.mailgate.org> ENVID=x+0D+0A250+20" + MARK),
    ([_EHLO], b"MAIL FROM:<a@client.mailgate.org> \x0b" + MARK + b"=1"),
    ([_EHLO], b"MAIL FROM:<a@client.mailgate.org> SIZE=1\x0b" + MARK),
    ([_EHLO], b"MAIL FROM:<a@client.mailgate.org> BODY=\xe2\x80\xa8" + MARK),
    ([_EHLO, _MAIL], b"RCPT TO:<alice@" + HOSTNAME.encode() + b"> ORCPT=rfc822;a+0D+0A" + MARK),
    ([_EHLO, _MAIL], b"RCPT TO:<alice@" + HOSTNAME.encode() + b"> NOTIFY=\x0b" + MARK),
    ([_EHLO, _MAIL], b'RCPT TO:<"x\x0b' + MARK + b'"@' + HOSTNAME.encode() + b">"),
    ([_EHLO, _MAIL], b"RCPT TO:<x@\x0c" + MARK + b">"),
    ([_EHLO, _MAIL], b"RCPT TO:<" + MARK + b"\xc2\x85x@elsewhere.example.net> SMTPUTF8"),
    ([_EHLO], b"VRFY a\x0b" + MARK),
    ([_EHLO], b"EXPN a\x0b" + MARK),
    ([_EHLO], b"BDAT 1\x0b" + MARK),
    ([_EHLO], b"AUTH \x0b" + MARK),
    ([_EHLO], b"AUTH PLAIN \x0b" + MARK),
    ([_EHLO], MARK + b"\x0bCOMMAND"),
    ([_EHLO], b"NOOP \x1c" + MARK),
]


@pytest.mark.parametrize("setup,hostile", HOSTILE, ids=[repr(h)[2:30] for _, h in HOSTILE])
def test_no_reply_carries_attacker_line_breaks(
    secure: Secure, setup: list[bytes], hostile: bytes
) -> None:
    wire = Wire(secure.server)
    for line in setup:
        assert _check(wire.cmd(line)).code == 250
    lines = hostile.count(b"\n") + 1
    wire.send(hostile + b"\r\nQUIT\r\n")
    # One reply per line the client sent, each well formed (Wire.reply checks the form).
    replies = [_check(wire.reply()) for _ in range(lines + 1)]
    assert replies[-1].code == 221, replies
    assert wire.rest() == b""
    for r in replies:
        for line in r.lines:
            assert not _FORGED.match(b"%d " % r.code + line), r


# HELO names and sender addresses a server might accept, each trying to end the
# Received or Return-Path line and start a header of its own.
_HELO_TRIES = [HELO, "[IPv6:::1]", "[127.0.0.1]", "a.example.org;X-Injected:yes",
               "x\u2028X-Injected:yes.org", "\u00e9x\u0085X-Injected.org", "a(b).org"]
_SENDER_TRIES = ['"a>b\\"c X-Injected: yes"@client.mailgate.org',
                 '"x\u0085X-Injected: yes"@client.mailgate.org',
                 "x\u2028X-Injected@client.mailgate.org",
                 '"x\\ (comment) X-Injected:"@client.mailgate.org',
                 "a@[IPv6:::1]", "a@[127.0.0.1]"]


def _header_lines(path: Path) -> list[bytes]:
    return path.read_bytes().partition(b"\n\n")[0].split(b"\n")


@pytest.mark.parametrize("helo", _HELO_TRIES)
def test_stored_trace_headers_cannot_be_forged(secure: Secure, helo: str) -> None:
    before = set(stored_files(secure.server.maildir))
    accepted = 0
    for sender in _SENDER_TRIES:
        wire = Wire(secure.server)
        if wire.cmd(f"EHLO {helo}".encode()).code != 250:
            wire.close()
            continue
        if _check(wire.cmd(f"MAIL FROM:<{sender}> SMTPUTF8".encode())).code != 250:
            wire.close()
            continue
        assert _check(wire.cmd(f"RCPT TO:<alice@{HOSTNAME}>")).code == 250
        assert wire.cmd("DATA").code == 354
        r = _check(wire.cmd(b"From: a@client.mailgate.org\r\nSubject: t\r\n\r\nbody\r\n."))
        assert r.code == 250, r
        accepted += 1
        wire.close()
    new = set(stored_files(secure.server.maildir)) - before
    assert len(new) == accepted
    for path in new:
        lines = _header_lines(path)
        names = [line.split(b":", 1)[0] for line in lines if not line[:1].isspace()]
        assert names == [b"Return-Path", b"Received", b"From", b"Subject"], lines
        for line in lines:
            assert not _CONTROL.search(line.replace(b"\t", b" ")), lines
        received = b" ".join(line for line in lines if line.startswith((b"Received", b"\t")))
        assert b"by " + HOSTNAME.encode() in received
    if helo == HELO:
        assert accepted >= 2  # the test reached delivery: it checks something


def test_a_command_in_the_same_segment_as_the_tls_finished_is_answered(secure: Secure) -> None:
    """The first command after the handshake is real input, not pipelined plaintext."""
    for _ in range(20):
        wire = Wire(secure.server)
        assert wire.cmd(f"EHLO {HELO}").code == 250
        assert wire.cmd("STARTTLS").code == 220
        answer = eager_tls_command(wire, secure.tls, f"EHLO {HELO}\r\n".encode())
        assert answer.startswith(b"250-" + HOSTNAME.encode()), answer
        wire.close()
