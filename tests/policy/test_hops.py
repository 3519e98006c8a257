"""Mail loops (RFC 5321 6.3): too many Received: fields, ours included, is 554 5.4.6."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import client, envelope, run

from mailgate.delivery.spool import MEMORY_LIMIT, SpoolDir, SpoolFile
from mailgate.policy.hops import HopCountStep, received_fields

OURS = b"Received: from mail.client.lab (mail.client.lab [203.0.113.5])\r\n\tby mx.example.org\r\n"


def hop(n: int, pad: int = 0) -> bytes:
    return (
        f"Received: from relay{n}.example.net by relay{n + 1}.example.net;"
        f" {'x' * pad}\r\n\tWed, 25 Nov 2026 12:00:00 +0000\r\n"
    ).encode()


def spooled(tmp_path: Path, headers: bytes, body: bytes = b"hello\r\n") -> SpoolFile:
    spool = SpoolDir(str(tmp_path / "spool")).create("S1")
    spool.write(OURS)
    spool.write(headers + b"Subject: loop\r\n\r\n" + body)
    spool.close()
    return spool


def verdict(limit: int, spool: SpoolFile, trusted: bool = False) -> tuple[int | None, str]:
    result = run(HopCountStep(limit).message(client(trusted=trusted), envelope(), spool))
    return (result.reply.code, str(result.reply)) if result.reply else (None, "")


def test_the_limit_counts_our_own_field_and_refuses_one_more(tmp_path: Path) -> None:
    at_limit = spooled(tmp_path / "a", b"".join(hop(n) for n in range(99)))
    assert received_fields(at_limit) == 100
    assert verdict(100, at_limit) == (None, "")
    over = spooled(tmp_path / "b", b"".join(hop(n) for n in range(100)))
    code, text = verdict(100, over)
    assert code == 554
    assert text.startswith("554 5.4.6 Too many hops (101 Received: header fields)")


def test_trusted_clients_are_refused_too(tmp_path: Path) -> None:
    looping = spooled(tmp_path, b"".join(hop(n) for n in range(5)))
    assert verdict(3, looping, trusted=True)[0] == 554


def test_only_header_field_names_count(tmp_path: Path) -> None:
    headers = (
        hop(1)
        + b"X-Note: Received: this is not a field name\r\n"
        + b"received : from an old mailer with a space before the colon\r\n"
        + b"RECEIVED: from a shouting one\r\n"
    )
    body = b"Received: from the body, which is not a header\r\n" * 50
    spool = spooled(tmp_path, headers, body)
    assert received_fields(spool) == 4  # ours, hop(1), the spaced and the upper case


def test_a_header_section_longer_than_the_first_read_is_followed(tmp_path: Path) -> None:
    # 150 fields of ~600 octets: 90 KB of header, in a message spooled to disk.
    headers = b"".join(hop(n, pad=550) for n in range(150))
    spool = spooled(tmp_path, headers, b"y" * (MEMORY_LIMIT + 10))
    assert spool.held() is None  # on disk, not in memory
    assert received_fields(spool) == 151
    assert verdict(100, spool)[0] == 554


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_a_message_without_a_body_or_with_bare_lf(tmp_path: Path, ending: bytes) -> None:
    spool = SpoolDir(str(tmp_path / "spool")).create("S1")
    spool.write(hop(1).replace(b"\r\n", ending) * 3)  # no empty line at all
    spool.close()
    assert received_fields(spool) == 3
