"""Which MAIL FROM addresses an authenticated user owns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.senders import SenderMap, parse_senders_file
from mailgate.config.auth import AuthConfig

MAP = SenderMap(
    {
        "alice": ["alice@example.org", "Sales@Example.COM", "@alice.example"],
        "relay": ["*"],
    },
    ["example.org", "Example.NET"],
)


@pytest.mark.parametrize(
    ("user", "address", "allowed"),
    [
        ("bob", "bob@example.org", True),  # default: own name at a default domain
        ("bob", "BOB@example.net", True),
        ("bob", "<bob@example.org.>", True),
        ("bob", "bob@example.com", False),  # not a default domain
        ("bob", "alice@example.org", False),
        ("bob", "bob", False),
        ("bob", "", False),  # the null sender is not anybody's by default
        ("alice", "alice@example.org", True),
        ("alice", "sales@example.com", True),
        ("alice", "anything@alice.example", True),
        ("alice", "alice@example.net", False),  # listed: the default no longer applies
        ("alice", "x@sub.alice.example", False),
        ("alice", "", False),
        ("relay", "whoever@wherever.example", True),
        ("relay", "", True),
        ("carol@example.com", "carol@example.com", True),  # a user name that is an address
        ("carol@example.com", "carol@example.org", False),
    ],
)
def test_rules(user: str, address: str, allowed: bool) -> None:
    assert MAP.may_send_as(user, address) is allowed


def test_a_domain_is_one_in_u_labels_and_a_labels() -> None:
    senders = SenderMap(
        {"anna": ["anna@bücher.example", "@xn--mller-kva.example"]}, ["xn--bcher-kva.example"]
    )
    assert senders.may_send_as("bob", "bob@bücher.example")  # a default domain
    assert senders.may_send_as("bob", "Bob@BÜCHER.example")
    assert senders.may_send_as("anna", "anna@xn--bcher-kva.example")  # listed address
    assert senders.may_send_as("anna", "who@müller.example")  # listed domain
    assert not senders.may_send_as("anna", "anna@bucher.example")


def test_no_default_domains_means_only_listed() -> None:
    assert not SenderMap({}, []).may_send_as("bob", "bob@example.org")


@pytest.mark.parametrize("entry", ["example.org", "bob@", "a b@example.org"])
def test_bad_entry_in_the_config_table(entry: str) -> None:
    with pytest.raises(ValueError, match=r"senders\.bob: .* is not an address"):
        AuthConfig(senders={"bob": [entry]})
    with pytest.raises(ValueError, match=r"senders: bob: .* is not an address"):
        SenderMap({"bob": [entry]}, [])


def test_file_format_and_errors() -> None:
    table = parse_senders_file("# c\nbob: bob@x.example, @y.example  # note\nbob: *\n", "s")
    assert table == {"bob": ["bob@x.example", "@y.example", "*"]}
    # "#" inside an address is no comment (a#b@x.example is an address)
    assert parse_senders_file("al: a#b@x.example #c\n", "s") == {"al": ["a#b@x.example"]}
    with pytest.raises(ValueError, match=r"^s:3: expected"):
        parse_senders_file("\n\njust words\n", "s")
    with pytest.raises(ValueError, match=r"^s:1: 'nodomain@' is not"):
        parse_senders_file("bob: nodomain@\n", "s")


def test_authenticator_merges_config_and_file(
    make_auth: Callable[..., Authenticator], tmp_path: Path
) -> None:
    senders = tmp_path / "senders"
    senders.write_text("alice: @shop.example\n")
    auth = make_auth(senders={"alice": ["boss@example.org"]}, senders_file=str(senders))
    assert auth.may_send_as("alice", "boss@example.org")
    assert auth.may_send_as("alice", "orders@shop.example")
    assert not auth.may_send_as("alice", "alice@example.org")
    assert auth.may_send_as("bob", "bob@example.org")  # local_domains from the factory


def test_sender_domains_override_local_domains(make_auth: Callable[..., Authenticator]) -> None:
    auth = make_auth(sender_domains=["mail.example"])
    assert auth.may_send_as("bob", "bob@mail.example")
    assert not auth.may_send_as("bob", "bob@example.org")
