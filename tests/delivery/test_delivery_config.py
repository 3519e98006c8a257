"""The [delivery] section as an operator writes it, read by the real config loader."""

from __future__ import annotations

import tomllib

import pytest

import mailgate.config.delivery as delivery_config
from mailgate.config.errors import ConfigError
from mailgate.config.loader import from_data
from mailgate.config.schema import Config


def load(text: str) -> Config:
    return from_data(tomllib.loads(text), "test.toml")


def test_the_documented_example_loads() -> None:
    doc = delivery_config.__doc__ or ""
    example = doc[doc.index("    [delivery]") :].replace("\n    ", "\n")
    delivery = load(example).delivery
    assert delivery.relay == "outbound"
    assert {name: d.type for name, d in delivery.destinations.items()} == {
        "archive": "mbox",
        "lists": "pipe",
        "outbound": "smtp",
    }
    outbound = delivery.destinations["outbound"].smtp
    assert outbound is not None and (outbound.host, outbound.port) == ("smarthost.example.net", 587)
    assert delivery.aliases["sales@example.org"] == ["alice", "bob@example.org"]


def test_a_single_alias_target_may_be_a_string() -> None:
    delivery = load('[delivery]\naliases = { postmaster = "alice" }\n').delivery
    assert delivery.aliases == {"postmaster": ["alice"]}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[delivery]\ndefault = "nowhere"', "delivery.default: no destination named 'nowhere'"),
        ('[delivery.destinations.x]\ntype = "pipe"', "needs its [pipe] sub-table"),
        ('[delivery.destinations.x.mbox]\npath = "/m/{uid}"', "only {user} and {domain}"),
        # (it said: port must be a number from 0 to 65535, got "relative")
        ('[delivery.destinations.x.lmtp]\naddress = "unix:relative"',
         "delivery.destinations.x.lmtp.address: a Unix socket's path must be absolute"),
        # valid for str.format(), and never a mailbox name (an attribute, a repr, a
        # 99,999,999-character padding)
        ('[delivery.destinations.x.mbox]\npath = "/m/{user.__class__}"',
         "only {user} and {domain} may appear, not {user.__class__}"),
        ('[delivery.destinations.x.mbox]\npath = "/m/{user!r}"', "not {user!r}"),
        ('[delivery.destinations.x.mbox]\npath = "/m/{user:>99999999}"', "not {user:>99999999}"),
        ('[delivery.destinations.x.mbox]\npath = "/m/{user"', "only {user} and {domain}"),
        # their mail could only ever be refused (553 5.1.3, 550 5.1.1)
        ('[delivery]\nlocal_users = ["alice", ".."]',
         "delivery.local_users[2]: '..' cannot name a mailbox"),
        ('[delivery]\nlocal_users = ["a/b"]', "delivery.local_users[1]: 'a/b' cannot name"),
        ('[delivery.aliases]\narchive = ["alice", "/var/archive/mail"]',
         "delivery.aliases.archive: '/var/archive/mail': file and program targets are not "
         "supported"),
        ('[delivery]\nmaildir_layout = "flat"', "delivery.maildir_layout"),
    ],
)
def test_mistakes_are_reported_by_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    assert any(error in line for line in caught.value.errors), caught.value.errors
