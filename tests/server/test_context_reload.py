"""A reload's configuration reaches what the server context derived from the old one."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path

import pytest

from mailgate import app
from mailgate.app import build_context
from mailgate.config.loader import load_config


def _config(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[server]\nspool_dir = "{tmp_path}/spool"\n{server}'
        f'[delivery]\nmaildir_root = "{tmp_path}/maildir"\n'
    )
    return path


def test_use_config_takes_the_new_networks_and_name(tmp_path: Path) -> None:
    ctx = build_context(load_config(str(_config(tmp_path, 'hostname = "mx.mailgate.org"\n'))))
    balancer = ipaddress.ip_address("192.0.2.10")
    assert not ctx.proxy_allowed(balancer) and not ctx.normalize_bare_lf(balancer)
    fresh = build_context(load_config(str(_config(
        tmp_path,
        'hostname = "mx2.mailgate.org"\nproxy_from = ["192.0.2.0/24"]\n'
        'normalize_bare_lf_from = ["192.0.2.10"]\n',
    ))))
    ctx.use_config(fresh.config, fresh.hostname)
    assert ctx.proxy_allowed(balancer) and ctx.normalize_bare_lf(balancer)
    assert ctx.hostname == "mx2.mailgate.org"
    assert ctx.config.server.proxy_from == ["192.0.2.0/24"]


def test_proxy_from_reads_addresses_as_trusted_networks_does(tmp_path: Path) -> None:
    # An IPv4-mapped entry never matched (check-config said OK, and every header of
    # the balancer was refused as "not an address of server.proxy_from"); nor did a
    # dual-stack listener's mapped form of an IPv4 balancer.
    ctx = build_context(load_config(str(_config(
        tmp_path, 'proxy_from = ["::ffff:127.0.0.1"]\nnormalize_bare_lf_from = ["192.0.2.0/24"]\n'
    ))))
    assert ctx.proxy_allowed(ipaddress.ip_address("127.0.0.1"))
    assert ctx.normalize_bare_lf(ipaddress.ip_address("::ffff:192.0.2.77"))
    assert not ctx.proxy_allowed(ipaddress.ip_address("127.0.0.2"))


def test_reloads_asked_for_close_together_end_on_the_last_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two SIGHUPs 0.2 s apart, the first file slow to load (a large alias list): run
    # side by side, the first reload finished last and its older file won.
    path = _config(tmp_path, 'hostname = "start.mailgate.org"\n')
    real = app._load_named

    def load(config_path: str | None, overrides: app.Overrides) -> object:
        config = real(config_path, overrides)
        if config.server.hostname == "slow.mailgate.org":
            time.sleep(0.3)
        return config

    monkeypatch.setattr(app, "_load_named", load)

    async def go() -> str:
        server = app.MailServer(load_config(str(path)), str(path))
        _config(tmp_path, 'hostname = "slow.mailgate.org"\n')
        server.request_reload()
        await asyncio.sleep(0.1)
        _config(tmp_path, 'hostname = "last.mailgate.org"\n')
        server.request_reload()
        server.request_reload()  # (a third, while the second waits: one more reload)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if server._reloading is not None and server._reloading.done():
                break
        await asyncio.sleep(0.5)  # (longer than the slow load: nothing is still running)
        return server.ctx.hostname

    assert asyncio.run(go()) == "last.mailgate.org"
