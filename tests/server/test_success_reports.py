"""NOTIFY=SUCCESS reports after the 250: a report that cannot be made must never
undo the message's acceptance (a 4xx or a 421 then would make the client send it
twice)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

from mailgate.app import build_context
from mailgate.config.loader import load_config
from mailgate.delivery.base import RecipientResult
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import reply


class _Session:
    message_id = "S1.1"
    message_arrival = None

    def __init__(self) -> None:
        self.logged: list[tuple[str, dict[str, object]]] = []

    def log_event(self, name: str, /, **fields: object) -> None:
        self.logged.append((name, fields))


class _UnreadableSpool:
    def read_head(self, limit: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")


def _report_success(
    tmp_path: Path, delivery: str, rcpt: str, sender: str, spool: object
) -> dict[str, object]:
    """A NOTIFY=SUCCESS report of ``rcpt``'s delivery to ``sender``; its one log line."""
    config_path = tmp_path / "mailgate.toml"
    config_path.write_text(
        f'[server]\nhostname = "mx.mailgate.org"\nspool_dir = "{tmp_path}/spool"\n'
        f'[delivery]\nmaildir_root = "{tmp_path}/maildir"\n{delivery}'
    )
    ctx = build_context(load_config(str(config_path)))
    recipient = Recipient(Address(rcpt, "localhost"), ("SUCCESS",))
    envelope = Envelope(sender=Address(sender, "localhost"), recipients=[recipient])
    session = _Session()
    results = [RecipientResult(recipient, reply("ok"))]
    asyncio.run(ctx.notify_success(session, envelope, results, spool))  # type: ignore[arg-type]
    [(name, fields)] = session.logged
    assert name == "dsn"
    return fields


def test_an_unreadable_spool_is_logged_and_the_message_stays_accepted(tmp_path: Path) -> None:
    fields = _report_success(tmp_path, 'local_users = ["alice"]\n', "root", "alice",
                             _UnreadableSpool())
    assert fields["level"] == "error" and "Input/output" in str(fields["error"])
    assert not (tmp_path / "maildir" / "alice").exists()  # no report was half-made


class _Spool:
    def read_head(self, limit: int) -> bytes:
        return b"Subject: hello\r\n\r\n"


def test_a_report_that_cannot_be_delivered_says_why(tmp_path: Path) -> None:
    # It logged only code=550 at info: the operator could not see that (and why)
    # the report itself was refused.
    fields = _report_success(
        tmp_path, 'system_users = false\nlocal_users = ["alice"]\n'
        '[delivery.aliases]\npostmaster = "alice"\n', "alice", "nobody", _Spool(),
    )
    assert fields["level"] == "warning" and fields["code"] == 550
    assert fields["status"] == "5.1.1" and "nobody@localhost" in str(fields["reply"])
