"""CPU the sans-I/O engine spends per message, without sockets or the event loop.

Run by hand (never by the test suite):

    .venv/bin/python bench/engine_micro.py [-n MESSAGES] [-r ROUNDS]

It drives :class:`mailgate.protocol.connection.Connection` the way
``mailgate/server/session.py`` does for the benchmark's smtp-source transcript (EHLO
once, then per message MAIL, RCPT, DATA, a ~1 KB body and ".", answered 250/250/354/250):
feed the client's bytes, pull events until NEED_DATA, accept every decision (the end
of data with ``reply("data.accepted", id=...)`` as the server's outcome code does),
collect body chunks and drain ``data_to_send()``.  It prints the best round's
process-CPU microseconds per message (best, because the machine is shared and noise
only ever adds time).

To compare with another version of the engine, put that version's ``mailgate``
package first on the path, e.g.
``git archive HEAD mailgate | tar -x -C /tmp/base`` then
``PYTHONPATH=/tmp/base .venv/bin/python bench/engine_micro.py``.
"""

from __future__ import annotations

import argparse
import time

from mailgate.protocol import events as ev
from mailgate.protocol.connection import Connection, Settings
from mailgate.protocol.replies import reply

HELO = b"EHLO client.bench.internal\r\n"
MAIL = b"MAIL FROM:<bench@client.bench.internal>\r\n"
RCPT = b"RCPT TO:<user@bench.internal>\r\n"
DATA = b"DATA\r\n"


def _body(size: int = 1024) -> bytes:
    """Headers and ~size bytes of text lines, then the end marker, in one read (the
    way smtp-source's buffered stream writes a small message)."""
    head = (
        b"From: <bench@client.bench.internal>\r\n"
        b"To: <user@bench.internal>\r\n"
        b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
        b"Message-Id: <1.2.3@client.bench.internal>\r\n"
        b"\r\n"
    )
    line = b"La de da de da 1. La de da de da 2. La de da de da 3. La de da de da 4.\r\n"
    return head + line * (size // len(line)) + b".\r\n"


def _drive(conn: Connection, data: bytes, message_id: str) -> bytes:
    """Feed one client read, answer events like the server, return the reply bytes."""
    conn.receive_data(data)
    body = 0
    while True:
        event = conn.next_event()
        if event is ev.NEED_DATA:
            return conn.data_to_send()
        if isinstance(event, ev.BodyChunk):
            body += len(event.data)  # the server writes it to its spool
        elif isinstance(event, ev.MessageEnd):
            conn.accept(reply("data.accepted", id=message_id))
        else:
            conn.accept()


def run(messages: int) -> float:
    """CPU seconds for ``messages`` transactions on one connection."""
    conn = Connection(Settings("mx.bench.internal"))
    conn.greet()
    conn.data_to_send()
    _drive(conn, HELO, "")
    body = _body()
    start = time.process_time()
    for i in range(messages):
        message_id = f"0123456789ab.{i}"
        _drive(conn, MAIL, message_id)
        _drive(conn, RCPT, message_id)
        _drive(conn, DATA, message_id)
        _drive(conn, body, message_id)
    return time.process_time() - start


def check() -> None:
    """Fail loudly if the engine does not answer the transcript as the bench expects."""
    conn = Connection(Settings("mx.bench.internal"))
    conn.greet()
    conn.data_to_send()
    assert _drive(conn, HELO, "").startswith(b"250-mx.bench.internal")
    got = [_drive(conn, data, "x.1") for data in (MAIL, RCPT, DATA, _body())]
    assert got == [
        b"250 2.1.0 Sender <bench@client.bench.internal> OK\r\n",
        b"250 2.1.5 Recipient <user@bench.internal> OK\r\n",
        b"354 Start mail input; end with <CRLF>.<CRLF>\r\n",
        b"250 2.0.0 OK: queued as x.1\r\n",
    ], got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=20_000)
    parser.add_argument("-r", "--rounds", type=int, default=7)
    args = parser.parse_args()
    check()
    run(1000)  # warm up
    best = min(run(args.messages) for _ in range(args.rounds))
    print(f"{best / args.messages * 1e6:.2f} us CPU per message (best of {args.rounds})")


if __name__ == "__main__":
    main()
