"""The discard destination: 250 for every recipient routed to it, nothing stored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from delivery_helpers import TRACE, envelope, files, spooled

from mailgate.config.delivery import DeliveryConfig, DestinationConfig, MboxConfig
from mailgate.config.loader import from_data
from mailgate.config.schema import Config
from mailgate.delivery.dsn import success_recipients
from mailgate.delivery.factory import build_router
from mailgate.protocol.envelope import Recipient

MESSAGE = b"Subject: trap\r\n\r\nbuy now\r\n"


def test_mail_routed_to_discard_is_accepted_and_not_stored(tmp_path: Path) -> None:
    config = DeliveryConfig(
        maildir_root=str(tmp_path / "md"),
        local_domains=["example.org"],
        system_users=False,
        local_users=["alice", "trap"],
        users={"trap": "blackhole"},
        destinations={"blackhole": DestinationConfig(type="discard")},
    )
    router = build_router(config, "mx.example.org")
    env = envelope("trap@example.org", "alice@example.org")
    env.recipients = [Recipient(r.address, ("SUCCESS",)) for r in env.recipients]
    spool = spooled(tmp_path, MESSAGE, env)
    results = asyncio.run(router.deliver(env, TRACE, spool))
    assert [(str(r.recipient.address), r.reply.code) for r in results] == [
        ("trap@example.org", 250),
        ("alice@example.org", 250),
    ]
    # NOTIFY=SUCCESS: alice's delivery is reported, the trap never answers its senders
    assert success_recipients(results) == [results[1]]
    assert files(tmp_path / "md" / "trap") == []  # the trap's copy went nowhere
    assert len(files(tmp_path / "md" / "alice" / "new")) == 1  # alice's was stored


def test_discard_as_default_takes_every_local_recipient(tmp_path: Path) -> None:
    config = DeliveryConfig(
        maildir_root=str(tmp_path / "md"),
        local_domains=["example.org"],
        system_users=False,
        local_users=["alice"],
        default="void",
        destinations={"void": DestinationConfig(type="discard")},
    )
    router = build_router(config, "mx.example.org")
    env = envelope("alice@example.org")
    results = asyncio.run(router.deliver(env, TRACE, spooled(tmp_path, MESSAGE, env)))
    assert [r.reply.code for r in results] == [250]
    assert not (tmp_path / "md").exists()


def test_discard_from_toml_and_no_sub_table_allowed() -> None:
    raw = {"delivery": {"destinations": {"trap": {"type": "discard"}}}}
    config = from_data(raw, "test.toml", Config)
    assert config.delivery.destinations["trap"].type == "discard"
    with pytest.raises(ValueError, match="do not match type 'discard'"):
        DestinationConfig(type="discard", mbox=MboxConfig())
