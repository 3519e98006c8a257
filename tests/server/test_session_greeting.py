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
from tests.server.harness import Transport


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


@pytest.mark.parametrize("stage", ["connect", "helo"])
def test_a_temporary_refusal_there_is_421_and_the_end(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(f'[server]\nhostname = "mx.mailgate.org"\nspool_dir = "{tmp_path}/s"\n'
                    f'[delivery]\nmaildir_root = "{tmp_path}/m"\n')
    ctx = build_context(load_config(str(path)))
    ctx.policy = PolicyEngine([_Broken(stage)], NetworkList())

    async def go() -> bytes:
        session = Session(ctx, build_listeners(ctx)[0])
        transport = Transport([], peer="192.0.2.7")
        session.connection_made(transport)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        session.data_received(b"EHLO client.mailgate.org\r\n")
        await asyncio.wait_for(session._task, 5)  # type: ignore[arg-type]
        assert transport.closing
        return b"".join(transport.writes)

    written = asyncio.run(go())
    assert written.splitlines()[-1] == b"421 4.3.0 mx.mailgate.org Local error, closing connection"
    assert b"451" not in written
