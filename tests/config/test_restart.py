"""Which configuration changes wait for a restart (a reload cannot apply them)."""

from __future__ import annotations

from mailgate.config.restart import RESTART_ONLY, restart_only_changes
from mailgate.config.schema import Config
from mailgate.config.server import ListenerConfig


def test_the_same_configuration_needs_no_restart() -> None:
    assert restart_only_changes(Config(), Config()) == []


def test_what_a_reload_applies_is_not_reported() -> None:
    new = Config()
    new.server.hostname = "mx2.example.org"
    new.server.max_recipients = 500
    new.server.proxy_from = ["192.0.2.0/24"]
    new.delivery.local_domains = ["example.org"]
    assert restart_only_changes(Config(), new) == []


def test_each_restart_only_change_is_named() -> None:
    new = Config()
    new.listener = [ListenerConfig(address="0.0.0.0:25")]
    new.server.workers = 4
    new.server.spool_dir = "/var/spool/mailgate"
    new.logging.level = "debug"
    new.metrics.listen = "127.0.0.1:9125"
    assert restart_only_changes(Config(), new) == [
        "listener", "server.workers", "server.spool_dir", "logging", "metrics"
    ]


def test_a_listener_option_counts_as_a_listener_change() -> None:
    new = Config()
    new.listener[0].require_tls = True
    assert restart_only_changes(Config(), new) == ["listener"]


def test_every_path_names_a_real_key() -> None:
    config = Config()
    for path in RESTART_ONLY:
        value: object = config
        for name in path.split("."):
            assert hasattr(value, name), path
            value = getattr(value, name)
