"""LMTPDestination against a real Dovecot LMTP server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from dovecot_fixture import DOMAIN, Dovecot, dovecot_server, free_port  # noqa: F401

from mailgate.config.delivery import LMTPConfig
from mailgate.delivery.base import TraceInfo
from mailgate.delivery.lmtp import VERIFIERS, LMTPDestination
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply

TRACE = TraceInfo("abc123", "client.test", "192.0.2.1", None, "mx.test", "ESMTP")


@dataclass
class Spooled:
    path: str
    size: int
    no_bare_cr: bool = False  # as for BDAT data: line ends made CRLF on the wire


def spool(tmp_path: Path, data: bytes) -> Spooled:
    p = tmp_path / "msg.spool"
    p.write_bytes(data)
    return Spooled(str(p), len(data))


def envelope(*users: str) -> tuple[Envelope, list[Recipient]]:
    rcpts = [Recipient(Address(u, DOMAIN)) for u in users]
    env = Envelope(helo="client.test", sender=Address("sender", "client.test"), recipients=rcpts)
    return env, rcpts


def big_message() -> bytes:
    """Over one 256 KiB chunk, with dot lines everywhere, 8-bit text and a long line."""
    head = (
        b"Received: from client.test ([192.0.2.1]) by mx.test with ESMTP id abc123;"
        b" Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Subject: dots\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    lines = [b".", b"..", b".leading dot", b"caf\xc3\xa9", b"", b"x" * 900]
    body = b"".join(lines[i % len(lines)] + b"\r\n" for i in range(40_000))
    return head + b".first body line\r\n" + body + b".\r\n.last\r\n"


def test_two_users_get_the_message_byte_for_byte(dovecot: Dovecot, tmp_path: Path) -> None:
    message = big_message()
    env, rcpts = envelope("alice", "bob")
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=20), "mx.test")
    results = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, message), rcpts))
    assert [(r.recipient, r.reply.code) for r in results] == [(rcpts[0], 250), (rcpts[1], 250)]
    for user in ("alice", "bob"):
        (stored,) = dovecot.maildir_messages(user)
        # Dovecot stores LF line ends and adds Return-Path and its own Received first.
        assert stored.startswith(b"Return-Path: <sender@client.test>\n")
        assert stored.endswith(message.replace(b"\r\n", b"\n"))
        added = stored[: len(stored) - len(message.replace(b"\r\n", b"\n"))]
        assert added.count(b"\nReceived: ") == 1


def test_unknown_user_fails_alone(dovecot: Dovecot, tmp_path: Path) -> None:
    env, rcpts = envelope("nosuchuser", "alice")
    dest = LMTPDestination(LMTPConfig(dovecot.address), "mx.test")
    message = b"Subject: hi\r\n\r\nhello\r\n"
    results = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, message), rcpts))
    refused, stored = results
    assert refused.recipient is rcpts[0] and not refused.ok
    assert (refused.reply.code, refused.reply.enhanced) == (550, "5.1.1")
    assert "nosuchuser@example.test" in refused.reply.text
    assert stored.recipient is rcpts[1] and stored.ok
    assert dovecot.maildir_messages("alice")[0].endswith(b"Subject: hi\n\nhello\n")


def test_unix_socket(dovecot: Dovecot, tmp_path: Path) -> None:
    env, rcpts = envelope("bob")
    dest = LMTPDestination(LMTPConfig("unix:" + dovecot.unix_path), "mx.test")
    results = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, b"x\r\n"), rcpts))
    assert [r.reply.code for r in results] == [250]
    assert dovecot.maildir_messages("bob")[0].endswith(b"\nx\n")


def test_stopped_server_defers_every_recipient(dovecot: Dovecot, tmp_path: Path) -> None:
    dovecot.stop()
    env, rcpts = envelope("alice", "bob")
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=5), "mx.test")
    results = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, b"x\r\n"), rcpts))
    assert [(r.reply.code, r.reply.enhanced) for r in results] == [(451, "4.4.0")] * 2
    assert [r.recipient for r in results] == rcpts


def test_verify_recipient(dovecot: Dovecot) -> None:
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=5), "mx.test")

    async def run() -> list[bool | None]:
        answers = [
            await dest.verify_recipient(Address("alice", DOMAIN)),
            await dest.verify_recipient(Address("nosuchuser", DOMAIN)),
            await dest.verify_recipient(Address("bob", DOMAIN)),
        ]
        dovecot.stop()
        answers.append(await dest.verify_recipient(Address("alice", DOMAIN)))
        await dest.aclose()
        return answers

    assert asyncio.run(run()) == [True, False, True, None]
    # The checks left nothing behind: no mail was delivered.
    assert dovecot.maildir_messages("alice") == []


def test_a_domain_in_u_labels_reaches_a_server_without_smtputf8(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    # A local domain configured as bücher.example: this Dovecot offers no SMTPUTF8
    # and refuses the U-label form (501), so it gets the A-labels, the same domain.
    address = Address("alice", "bücher.example")
    env = Envelope(helo="client.test", sender=Address("sender", "client.test"),
                   recipients=[Recipient(address)])
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=5), "mx.test")

    async def run() -> tuple[bool | None, list[int]]:
        verified = await dest.verify_recipient(address)
        results = await dest.deliver(env, TRACE, spool(tmp_path, b"x\r\n"), env.recipients)
        await dest.aclose()
        return verified, [r.reply.code for r in results]

    assert asyncio.run(run()) == (True, [250])
    assert dovecot.maildir_messages("alice")[0].endswith(b"\nx\n")


def test_a_utf8_sender_is_not_named_to_a_server_without_smtputf8(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    # Dovecot without SMTPUTF8 took MAIL FROM:<jörg@...> and stored the message with
    # Return-Path: <>: the sender was lost.  RFC 6531 3.2: 554 5.6.7 instead.  UTF-8
    # header fields of such a message still go to it, its final mailbox.
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=20), "mx.test")
    for user, sender in (("alice", Address("jörg", "bücher.example")),
                         ("bob", Address("joerg", "bücher.example"))):
        env, rcpts = envelope(user)
        env.smtputf8, env.sender = True, sender
        message = "Subject: Grüße\r\n\r\nbody\r\n".encode()
        (result,) = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, message), rcpts))
        expected = (554, "5.6.7") if user == "alice" else (250, "2.0.0")
        assert (result.reply.code, result.reply.enhanced) == expected
        assert "smarthost" not in str(result.reply)  # (no smarthost here)
    assert dovecot.maildir_messages("alice") == []
    (stored,) = dovecot.maildir_messages("bob")
    assert stored.startswith(b"Return-Path: <joerg@xn--bcher-kva.example>")
    assert "Subject: Grüße".encode() in stored


def test_a_utf8_recipient_fails_alone_at_a_server_without_smtputf8(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    # An alias with a member jörg: the others still get the message.
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=20), "mx.test")
    env, rcpts = envelope("alice", "jörg")
    env.smtputf8 = True
    results = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, b"x\r\n"), rcpts))
    assert [(r.reply.code, r.reply.enhanced) for r in results] == [
        (250, "2.0.0"), (553, "5.6.7")]
    assert len(dovecot.maildir_messages("alice")) == 1


def test_bare_line_ends_of_bdat_data_cannot_smuggle_a_message(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    # Dovecot takes <LF>.<CRLF> for the end of the data: BDAT data sent on as it came
    # would end there, and the rest would be read as a second transaction, to a
    # recipient that never passed our RCPT checks.  Line ends go as CRLF (RFC 5321 2.3.8).
    message = (
        "Subject: bdat\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@bank.test>\r\n"
        f"RCPT TO:<bob@{DOMAIN}>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n"
    ).encode()
    env, rcpts = envelope("alice")
    env.chunked = True
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=20), "mx.test")
    results = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, message), rcpts))
    assert [r.reply.code for r in results] == [250]
    (stored,) = dovecot.maildir_messages("alice")
    assert stored.endswith(message.replace(b"\r\n", b"\n"))
    assert dovecot.maildir_messages("bob") == []


def test_binarymime_to_a_server_without_it(dovecot: Dovecot, tmp_path: Path) -> None:
    # Dovecot offers CHUNKING but not BINARYMIME: binary data cannot go to it
    # unchanged (RFC 3030 3), text lines declared BINARYMIME can, as they are.
    dest = LMTPDestination(LMTPConfig(dovecot.address, timeout=20), "mx.test")
    for user, body, code in (("alice", b"Subject: b\r\n\r\n\x00\xff\r\n", (554, "5.6.3")),
                             ("bob", b"Subject: t\r\n\r\ncaf\xc3\xa9\r\n", (250, "2.0.0"))):
        env, rcpts = envelope(user)
        env.body, env.chunked = "BINARYMIME", True
        (result,) = asyncio.run(dest.deliver(env, TRACE, spool(tmp_path, body), rcpts))
        assert (result.reply.code, result.reply.enhanced) == code
    assert dovecot.maildir_messages("alice") == []
    (stored,) = dovecot.maildir_messages("bob")
    assert stored.endswith(b"\n\ncaf\xc3\xa9\n")


class _Refusing:
    """An LMTP server's RCPT answers by local part (aiosmtpd's LMTP)."""

    async def handle_RCPT(self, server, session, envelope, address, options):
        for prefix, answer in (("full", "552 5.2.2 Mailbox full"),
                               ("nobody", "550 5.1.1 No such user"),
                               ("plain", "550 Rejected"),
                               ("later", "452 4.2.2 Over quota, try later")):
            if address.startswith(prefix):
                return answer
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


class _LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler)


@contextlib.contextmanager
def _scripted_lmtp(handler: _Refusing, timeout: float) -> Iterator[LMTPDestination]:
    """An LMTPDestination to an aiosmtpd LMTP server answering RCPTs by ``handler``
    (no SMTPUTF8), running for the block."""
    port = free_port()
    controller = _LMTPController(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield LMTPDestination(LMTPConfig(f"127.0.0.1:{port}", timeout=timeout), "mx.test")
    finally:
        controller.stop()


def test_verify_recipient_keeps_a_refusal_that_is_not_user_unknown() -> None:
    # Dovecot's 552 5.2.2 at RCPT (lmtp_rcpt_check_quota) reached the client as 550
    # 5.1.1 "user unknown": a mailing list unsubscribes such an address.
    with _scripted_lmtp(_Refusing(), timeout=5) as dest:

        async def run() -> list[object]:
            answers = [await dest.verify_recipient(Address(user, DOMAIN))
                       for user in ("alice", "nobody", "plain", "full", "later", "j\u00f6rg")]
            await dest.aclose()
            return answers

        ok, unknown, plain, full, later, utf8 = asyncio.run(run())
    # a server without SMTPUTF8 can have no such mailbox: RFC 6531's 553 5.6.7, not
    # "user unknown" (it was 550 5.1.1)
    assert isinstance(utf8, Reply) and (utf8.code, utf8.enhanced) == (553, "5.6.7")
    assert (ok, unknown, plain) == (True, False, False)
    assert isinstance(full, Reply) and (full.code, full.enhanced) == (550, "5.2.2")
    assert "552 5.2.2 Mailbox full" in full.text
    assert isinstance(later, Reply) and (later.code, later.enhanced) == (451, "4.2.2")


def test_an_unreachable_server_is_not_asked_once_per_waiting_rcpt() -> None:
    # The checks share a few connections, one check at a time on each: with a server
    # that accepts and never answers, a waiting RCPT sat through all the timeouts
    # before its own.
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])  # and never a greeting

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    dest = LMTPDestination(LMTPConfig(address, timeout=0.5), "mx.test")

    async def run() -> list[object]:
        return list(await asyncio.gather(
            *(dest.verify_recipient(Address(f"u{i}", DOMAIN)) for i in range(3 * VERIFIERS))))

    try:
        assert asyncio.run(run()) == [None] * 3 * VERIFIERS
        assert len(held) == VERIFIERS  # the first round; the others answered at once
    finally:
        listener.close()
        for sock in held:
            sock.close()


class _SlowForOne(_Refusing):
    """Looks "slow" up for longer than the client waits (a user database that stalls
    on one entry); every other user at once."""

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("slow"):
            await asyncio.sleep(2)
        return await super().handle_RCPT(server, session, envelope, address, options)


def test_one_slow_lookup_does_not_defer_the_checks_of_other_recipients() -> None:
    with _scripted_lmtp(_SlowForOne(), timeout=0.5) as dest:

        async def run() -> tuple[object, list[object], object]:
            slow = asyncio.ensure_future(dest.verify_recipient(Address("slow", DOMAIN)))
            await asyncio.sleep(0.05)  # (its RCPT is out)
            # meanwhile, on connections of their own
            others = [await dest.verify_recipient(Address(u, DOMAIN)) for u in ("alice", "bob")]
            slow_answer = await slow  # its timeout
            # the server answered the others meanwhile: it is still asked
            after = await dest.verify_recipient(Address("carol", DOMAIN))
            await dest.aclose()
            return slow_answer, others, after

        slow, others, after = asyncio.run(run())
    assert slow is None  # its own RCPT gets 451
    assert others == [True, True]
    assert after is True
