"""Open relay: an untrusted, unauthenticated client cannot get mail relayed by any
address trick.  The server has a smarthost (a real SMTP sink run by the test) for
non-local recipients, so a leak would show up as mail at the sink; local maildirs must
not collect mail under a remote name either."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening.wire import (
    HELO,
    HOSTNAME,
    Sink,
    Wire,
    start,
    stored_files,
    untrusted_config,
    wait_until,
)
from tests.integration.server import RunningServer

LOCAL = HOSTNAME
UPPER = HOSTNAME.upper()
REMOTE = "victim.example.net"
# (RCPT argument, MAIL parameters).  None of these may be accepted as anything but mail
# for a local user.
TRICKS: list[str] = [
    f"<victim@{REMOTE}>",
    f"<victim%{REMOTE}@{LOCAL}>",
    f'<"victim@{REMOTE}"@{LOCAL}>',
    f"<@{LOCAL}:victim@{REMOTE}>",
    f"<{REMOTE}!victim@{LOCAL}>",
    f"<victim@{REMOTE}@{LOCAL}>",
    "<victim@[192.0.2.1]>",
    "<victim@[IPv6:2001:db8::1]>",
    "<victim@[IPv6:::ffff:192.0.2.1]>",
    "<victim@[127.0.0.2]>",
    f'<"victim%{REMOTE}"@{LOCAL}>',
    f'<"{REMOTE}!victim"@{LOCAL}>',
    f'<"victim\\@{REMOTE}"@{LOCAL}>',
    f"<VICTIM%{REMOTE.upper()}@{UPPER}>",
    f"<victim@{REMOTE}.>",
    f"<victim%{REMOTE}@{LOCAL}.>",
    f"<victim%{REMOTE}%relay2.example.org@{LOCAL}>",
    f"<{REMOTE}!relay2.example.org!victim@{LOCAL}>",
    f"<@{LOCAL},@{REMOTE}:victim@{REMOTE}>",
    f"<@{LOCAL},@relay2.example.org:victim%{REMOTE}@{LOCAL}>",
    f" <victim@{REMOTE}>",
    f"<victim@{REMOTE} >",
    f"< victim@{REMOTE}>",
    f"victim@{REMOTE}",
    f"<victim@localhost.{REMOTE}>",
    f"<victim@{LOCAL}.{REMOTE}>",
    f'<"victim"@{REMOTE}>',
    f"<postmaster@{REMOTE}>",
    f"<alice@{REMOTE}>",
    f"<root@{REMOTE}>",
    f"<alice+victim%{REMOTE}@{LOCAL}>",
    f'<"@{REMOTE}:victim@{REMOTE}"@{LOCAL}>',
    f"<victim@{REMOTE.replace('i', 'I')}>",
    "<victim@xn--vctim-vta.example.net>",
    "<victim@v\u00efctim.example.net> SMTPUTF8",
    f"<victim@{REMOTE}> ORCPT=rfc822;alice@{LOCAL}",
    f"<victim%{REMOTE}@localhost>",
    f"<victim%{REMOTE}@[127.0.0.1]>",
    "<victim@[]>",
    f"<victim@[{REMOTE}]>",
    f"<victim\\@{REMOTE}@{LOCAL}>",
    f"<alice@{LOCAL}@{REMOTE}>",
]


@dataclass
class Relay:
    server: RunningServer
    sink: Sink


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    workdir = tmp_path_factory.mktemp("relay")
    with Sink() as sink:
        config = untrusted_config(workdir, server="max_errors = 1000",
                                  delivery=sink.smarthost_config())
        running = start(workdir, config)
        yield Relay(running, sink)
        running.stop()


def _try(server: RunningServer, rcpt: str, utf8: bool) -> int:
    """One transaction to ``rcpt``; the RCPT reply code (and the message sent if 250)."""
    wire = Wire(server)
    try:
        assert wire.cmd(f"EHLO {HELO}").code == 250
        params = " SMTPUTF8" if utf8 else ""
        rcpt = rcpt.replace(" SMTPUTF8", "")
        assert wire.cmd(f"MAIL FROM:<spammer@client.mailgate.org>{params}".encode()).code == 250
        code = wire.cmd(f"RCPT TO:{rcpt}".encode()).code
        if code == 250:
            assert wire.cmd("DATA").code == 354
            wire.cmd(b"Subject: relay test\r\n\r\nbuy now\r\n.")
        wire.cmd("QUIT")
        return code
    finally:
        wire.close()


def test_no_relay_trick_relays(relay: Relay) -> None:
    assert len(TRICKS) >= 25
    codes = {rcpt: _try(relay.server, rcpt, utf8="SMTPUTF8" in rcpt) for rcpt in TRICKS}
    assert all(500 <= code < 600 for code in codes.values()), codes
    # A local recipient in an unusual but legitimate form is still taken, locally.
    assert _try(relay.server, f"<ALICE@{UPPER}>", utf8=False) == 250
    assert _try(relay.server, "<alice@[127.0.0.1]>", utf8=False) == 250
    assert relay.sink.received == []
    # Nothing was stored but for local users: no maildir was made under a remote name.
    assert sorted(p.name for p in relay.server.maildir.iterdir()) == ["alice"]
    assert len(stored_files(relay.server.maildir)) == 2


def test_the_sink_would_see_a_relayed_message(tmp_path: Path) -> None:
    """The control: a trusted client does relay through the same set-up, so the sink
    above would have caught a leak."""
    with Sink() as sink:
        config = untrusted_config(tmp_path, delivery=sink.smarthost_config()).replace(
            "trusted_networks = []", 'trusted_networks = ["127.0.0.0/8"]')
        running = start(tmp_path, config)
        try:
            assert _try(running, f"<victim@{REMOTE}>", utf8=False) == 250
            assert wait_until(lambda: len(sink.received) == 1, 10)
            assert sink.received[0].rcpt_tos == [f"victim@{REMOTE}"]
        finally:
            running.stop()


def test_an_internationalized_local_domain_is_local_in_both_spellings(tmp_path: Path) -> None:
    """A client without SMTPUTF8 must name bücher.example as xn--bcher-kva.example
    (RFC 5890); that is still the local domain, not a relay attempt, and both forms
    reach the same mailbox."""
    config = untrusted_config(tmp_path, delivery='local_domains = ["bücher.example"]')
    running = start(tmp_path, config)
    try:
        assert _try(running, "<alice@xn--bcher-kva.example>", utf8=False) == 250
        assert _try(running, "<Alice@BÜCHER.example>", utf8=True) == 250
        assert _try(running, "<alice@xn--mller-kva.example>", utf8=False) == 550  # not ours
        assert len(stored_files(running.maildir / "alice")) == 2
    finally:
        running.stop()
