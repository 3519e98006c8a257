"""CPU per message of the policy and delivery decisions alone (run by hand).

Builds the Router and PolicyEngine the way ``mailgate serve`` does for the bench
configuration in bench/RESULTS.md (local_domains ["bench.internal"], local_users
["user"], discard default, verify_sender_domain false, client 127.0.0.1 trusted) and
runs what a session asks of them per message: policy at MAIL, RCPT, DATA, the
Received: header, policy at the end of data, and delivery.  No sockets, no engine,
no logging: only the decisions.  Prints µs of process CPU per message.

    .venv/bin/python bench/policy_micro.py            # discard, 20,000 messages x 5
    .venv/bin/python bench/policy_micro.py --maildir  # the Maildir store instead
    .venv/bin/python bench/policy_micro.py -n 50000 -r 7
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers import HELO, mailgate_config  # noqa: E402  (bench/ is this script's path)

from mailgate.config.loader import load_config  # noqa: E402
from mailgate.delivery.base import TraceInfo  # noqa: E402
from mailgate.delivery.factory import build_router  # noqa: E402
from mailgate.delivery.spool import SpoolDir  # noqa: E402
from mailgate.delivery.trace import protocol_name, received_header  # noqa: E402
from mailgate.policy.base import Client  # noqa: E402
from mailgate.policy.factory import build_policy  # noqa: E402
from mailgate.protocol.envelope import Address, Envelope, Recipient  # noqa: E402

BODY = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"


async def run(work: str, default: str, messages: int, rounds: int) -> list[float]:
    path = Path(work) / "mailgate.toml"
    # the bench's own mailgate configuration, one process, no listener used
    path.write_text(mailgate_config(work, 0, default, 1))
    (Path(work) / "spool").mkdir()
    config = load_config(str(path))
    hostname = config.server.hostname
    router = build_router(config.delivery, hostname)
    policy = build_policy(config, router, hostname)
    spool_dir = SpoolDir(config.server.spool_dir)
    client = Client(ipaddress.ip_address("127.0.0.1"), 40000,
                    ipaddress.ip_address("127.0.0.1"), session_id="S1")
    assert (await policy.connect(client)).accepted
    assert (await policy.helo(client, HELO)).accepted
    client.helo = HELO
    protocol = protocol_name(True, False, False, False)

    async def one(n: int) -> None:
        envelope = Envelope(helo=HELO, extended=True,
                            sender=Address("bench", "client.bench.internal"))
        client.filter_state = "TRUSTED" if client.trusted else "ACCEPT"  # as the session
        assert (await policy.mail(client, envelope)).accepted
        recipient = Recipient(Address("user", "bench.internal"))
        assert (await policy.rcpt(client, envelope, recipient)).accepted
        envelope.recipients.append(recipient)
        assert (await policy.data(client, envelope)).accepted
        message_id = f"S1.{n}"
        trace = TraceInfo(message_id, HELO, str(client.ip), None, hostname, protocol)
        spool = spool_dir.create(message_id)
        spool.write(received_header(trace, envelope))
        spool.write(BODY)
        spool.close()
        assert (await policy.message(client, envelope, spool)).accepted
        results = await router.deliver(envelope, trace, spool)
        assert results[0].reply.code == 250, results
        spool.discard()

    for n in range(min(messages, 1000)):  # warm up caches and the allocator
        await one(n)
    per_message = []
    for _ in range(rounds):
        start = time.process_time()
        for n in range(messages):
            await one(n)
        per_message.append((time.process_time() - start) / messages * 1e6)
    await router.aclose()
    await policy.close()
    return per_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=20000)
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--maildir", action="store_true", help="deliver to the Maildir store")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's loop, not uvloop")
    args = parser.parse_args()
    if args.maildir and args.messages > 5000:
        args.messages = 2000  # fsync-bound: the CPU share is small, keep the run short
    default = "local" if args.maildir else "blackhole"
    with tempfile.TemporaryDirectory() as work:
        coro = run(work, default, args.messages, args.rounds)
        if args.asyncio:
            rounds = asyncio.run(coro)
        else:
            import uvloop

            rounds = uvloop.run(coro)
    print(
        f"{default}: {args.messages} messages x {args.rounds} rounds, CPU µs/message: "
        f"median {statistics.median(rounds):.1f}, min {min(rounds):.1f} "
        f"({', '.join(f'{r:.1f}' for r in rounds)})"
    )


if __name__ == "__main__":
    main()
