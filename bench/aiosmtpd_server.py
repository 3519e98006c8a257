"""The baseline: aiosmtpd on uvloop, discarding mail or storing it durably in a Maildir.

Run by bench/run.py as its own process so its CPU time and memory can be read from
/proc.  The Maildir handler does what mailgate's durable mode promises: the message
is written to tmp/, fsync'ed, linked into new/ and new/ fsync'ed before the 250, with
the file work in the default executor so the event loop keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP

_names = itertools.count()


class DiscardHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


class MaildirHandler:
    def __init__(self, root: str) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content or envelope.content
        await asyncio.get_running_loop().run_in_executor(None, self._store, data)
        return "250 2.0.0 OK"

    def _store(self, data: bytes) -> None:
        now = time.time()
        name = f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(_names)}.bench"
        tmp = os.path.join(self.root, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data.replace(b"\r\n", b"\n"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, os.path.join(self.root, "new", name))
        os.unlink(tmp)
        dfd = os.open(os.path.join(self.root, "new"), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


async def main(args: argparse.Namespace) -> None:
    handler: Any = MaildirHandler(args.maildir) if args.mode == "maildir" else DiscardHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench.internal",
                     data_size_limit=args.max_size),
        args.host, args.port, backlog=1024,
    )
    print(f"aiosmtpd listening on {args.host}:{args.port} ({args.mode})", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["discard", "maildir"], default="discard")
    parser.add_argument("--maildir", default="")
    parser.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    uvloop.run(main(parser.parse_args()))
