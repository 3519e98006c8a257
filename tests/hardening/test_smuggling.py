"""SMTP smuggling over the wire: no end-of-data look-alike ever starts a second
transaction, whether it arrives in one write or split across writes, with bare LF
refused (the default) or normalised for the client's network."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardening.wire import HELO, HOSTNAME, Wire, start, stored_files, untrusted_config
from tests.integration.server import RunningServer

ENDINGS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.LF": b"\r.\n",
}
HEAD = (
    f"EHLO {HELO}\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
    f"RCPT TO:<alice@{HOSTNAME}>\r\nDATA\r\n"
).encode()
LEGIT = b"Subject: legit\r\n\r\nhello"
SMUGGLED = (
    f"MAIL FROM:<evil@client.mailgate.org>\r\nRCPT TO:<bob@{HOSTNAME}>\r\nDATA\r\n"
    "Subject: smuggled\r\n\r\nevil\r\n.\r\n"
).encode()


@pytest.fixture(scope="module", params=["refuse", "normalize"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp(f"smuggling-{request.param}")
    extra = 'normalize_bare_lf_from = ["127.0.0.0/8"]' if request.param == "normalize" else ""
    running = start(workdir, untrusted_config(workdir, server=extra))
    yield running
    running.stop()


def _session(server: RunningServer, writes: list[bytes]) -> list[tuple[int, bytes]]:
    """Send ``writes`` (one TCP write each, apart in time), then the end of data and QUIT;
    return every reply line the server sent until it closed.  Replies are collected
    after every write: a server that hangs up may reset the connection, and a reset
    drops what was not read yet."""
    wire = Wire(server)
    raw = b""
    try:
        for data in [*writes, b"\r\n.\r\nQUIT\r\n"]:
            try:
                wire.send(data)
            except OSError:
                break  # the server already hung up on the bare line end: allowed
            time.sleep(0.02)
            raw += wire.available()
        raw += wire.rest()
    finally:
        wire.close()
    lines = [line for line in raw.split(b"\r\n") if line]
    return [(int(line[:3]), line) for line in lines]


def _splits(ending: bytes) -> dict[str, list[bytes]]:
    whole = HEAD + LEGIT + ending + SMUGGLED
    return {
        "one write": [whole],
        "split before": [HEAD + LEGIT, ending + SMUGGLED],
        "split after": [HEAD + LEGIT + ending, SMUGGLED],
        "byte by byte": [HEAD + LEGIT, *(bytes([b]) for b in ending), SMUGGLED],
    }


def _normalizing(server: RunningServer) -> bool:
    return "normalize_bare_lf_from" in server.config_path.read_text()


def _headers(path: Path) -> bytes:
    return path.read_bytes().partition(b"\n\n")[0]


@pytest.mark.parametrize("ending", list(ENDINGS), ids=list(ENDINGS))
def test_no_second_transaction(server: RunningServer, ending: str) -> None:
    before = set(stored_files(server.maildir))
    for split, writes in _splits(ENDINGS[ending]).items():
        replies = _session(server, writes)
        codes = [code for code, _ in replies]
        # Exactly one DATA was ever started, and at most one message was accepted.
        assert codes.count(354) == 1, (split, replies)
        queued = [line for code, line in replies if b"queued as" in line]
        assert len(queued) <= 1, (split, replies)
        if not _normalizing(server):  # bare LF or CR refused: the session ends on it
            assert not queued and codes[-1] == 521, (split, replies)
        # RCPT bob (the smuggled recipient) was never even answered as a command.
        assert not any(b"bob@" in line for _, line in replies), (split, replies)
        new = set(stored_files(server.maildir)) - before
        before |= new
        assert len(new) == len(queued), (split, replies, new)
        for path in new:
            assert path.parent.parent.name == "alice", path
            assert b"Subject: legit" in _headers(path)
            assert b"smuggled" not in _headers(path), path.read_bytes()
    assert not list(server.maildir.glob("bob/new/*"))


def test_a_real_end_of_data_does_start_the_next_transaction(server: RunningServer) -> None:
    """The control: the detector above sees a second transaction when there is one."""
    before = set(stored_files(server.maildir))
    replies = _session(server, [HEAD + LEGIT + b"\r\n.\r\n" + SMUGGLED[:-5]])
    assert [code for code, _ in replies].count(354) == 2, replies
    assert sum(b"queued as" in line for _, line in replies) == 2, replies
    new = set(stored_files(server.maildir)) - before
    assert sorted(p.parent.parent.name for p in new) == ["alice", "bob"]
    for path in new:
        if path.parent.parent.name == "bob":
            path.unlink()  # keep bob's box empty for the other tests of this module
