"""A temporary refusal at the greeting or at HELO is a 421 and the end of the session
(RFC 5321 4.3.2 lists no other 4xx there)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailgate.app import build_context, build_listeners
from mailgate.config.loader import load_config
from mailgate.policy.base import Client, Step, Verdict
from mailgate.policy.engine import PolicyEngine
from mailgate.policy.networks import NetworkList
from mailgate.server.session import Session


class _Broken(Step):
    """A site's step with a bug at one stage: the engine answers 451 4.3.0 for it."""

    name = "broken"

    def __init__(self, stage: str) -> None:
        self.stage = stage

    async def connect(self, client: Client) -> Verdict:
        if self.stage == "connect":
            raise RuntimeError("bug")
        return await super().connect(client)

    async def helo(self, client: Client, name: str) -> Verdict:
        if self.stage == "helo":
            raise RuntimeError("bug")
        return await super().helo(client, name)


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("192.0.2.1", 25)}.get(name)

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("stage", ["connect", "helo"])
def test_a_temporary_refusal_there_is_421_and_the_end(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(f'[server]\nhostname = "mx.mailgate.org"\nspool_dir = "{tmp_path}/s"\n'
                    f'[delivery]\nmaildir_root = "{tmp_path}/m"\n')
    ctx = build_context(load_config(str(path)))
    ctx.policy = PolicyEngine([_Broken(stage)], NetworkList())

    async def go() -> bytes:
        session = Session(ctx, build_listeners(ctx)[0])
        transport = _Transport()
        session.connection_made(transport)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        session.data_received(b"EHLO client.mailgate.org\r\n")
        await asyncio.wait_for(session._task, 5)  # type: ignore[arg-type]
        assert transport.closing
        return transport.written

    written = asyncio.run(go())
    assert written.splitlines()[-1] == b"421 4.3.0 mx.mailgate.org Local error, closing connection"
    assert b"451" not in written
