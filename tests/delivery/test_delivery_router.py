"""Routing: aliases, exactly-once fan-out, catch-all, per-user and per-domain routes."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from delivery_helpers import TRACE, address, envelope, files, spooled

from mailgate.config.delivery import (
    LOCAL_DESTINATION,
    DeliveryConfig,
    DestinationConfig,
    LMTPConfig,
    MboxConfig,
    PipeConfig,
)
from mailgate.delivery import factory
from mailgate.delivery.base import RecipientResult
from mailgate.delivery.discard import DiscardDestination
from mailgate.delivery.factory import DeliveryConfigError, build_router
from mailgate.delivery.router import ROUTE_CACHE_SIZE, Router, RoutingTable
from mailgate.policy.base import Client
from mailgate.policy.recipient import RecipientStep
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply, reply

HOST = "mx.example.org"
MESSAGE = b"Subject: routed\r\n\r\nhello\r\n"


def router(tmp_path: Path, **changes: Any) -> Router:
    settings: dict[str, Any] = dict(
        maildir_root=str(tmp_path / "md"),
        local_domains=["example.org", "example.net"],
        system_users=False,
        local_users=["alice", "bob", "carol", "root"],
        destinations={
            "archive": DestinationConfig(
                mbox=MboxConfig(path=str(tmp_path / "mbox/{domain}/{user}"))
            )
        },
    )
    settings.update(changes)
    return build_router(DeliveryConfig(**settings), HOST)


def deliver(tmp_path: Path, r: Router, *rcpts: str) -> list[str]:
    """The reply for each envelope recipient (and after them, for each address of an
    alias that failed, see test_each_address_of_an_expanded_alias_keeps_its_own_outcome)."""
    env = envelope(*rcpts)
    spool = spooled(tmp_path, MESSAGE, env)
    results = asyncio.run(r.deliver(env, TRACE, spool))
    assert [res.recipient for res in results][: len(env.recipients)] == env.recipients
    return [str(res.reply) for res in results]


def count(tmp_path: Path, user: str) -> int:
    return len(files(tmp_path / "md" / user / "new"))


def test_aliases_fan_out_and_every_mailbox_gets_one_copy(tmp_path: Path) -> None:
    r = router(tmp_path, aliases={"team": ["alice", "bob"], "all@example.org": ["team", "carol"]})
    replies = deliver(
        tmp_path,
        r,
        "team@example.org",
        "all@example.org",
        "Alice+news@example.org",
        "bob@example.net",
    )
    assert replies == ["250 2.0.0 OK"] * 4
    assert [count(tmp_path, u) for u in ("alice", "bob", "carol")] == [1, 1, 1]


def test_alias_loops_end_at_a_mailbox(tmp_path: Path) -> None:
    r = router(tmp_path, aliases={"alice": ["bob"], "bob": ["alice", "carol"]})
    assert deliver(tmp_path, r, "alice@example.org") == ["250 2.0.0 OK"]
    assert [count(tmp_path, u) for u in ("alice", "bob", "carol")] == [1, 0, 1]


def test_alias_to_itself_keeps_a_copy(tmp_path: Path) -> None:
    r = router(tmp_path, aliases={"alice": ["alice", "bob"]})
    deliver(tmp_path, r, "alice@example.org")
    assert [count(tmp_path, u) for u in ("alice", "bob")] == [1, 1]


def test_postmaster_goes_to_root_by_default(tmp_path: Path) -> None:
    r = router(tmp_path)
    assert r.has_recipient("PostMaster", "example.net")
    assert r.has_recipient("postmaster", "")  # the bare <Postmaster> form
    deliver(tmp_path, r, "postmaster@example.org", "postmaster")
    assert count(tmp_path, "root") == 1


def test_unknown_users_are_refused_without_a_catch_all(tmp_path: Path) -> None:
    r = router(tmp_path)
    assert not r.has_recipient("nobody", "example.org")
    replies = deliver(tmp_path, r, "nobody@example.org", "alice@example.org")
    assert replies == ["550 5.1.1 <nobody@example.org> ... user unknown", "250 2.0.0 OK"]


def test_catch_all_receives_mail_for_unknown_users(tmp_path: Path) -> None:
    r = router(tmp_path, catch_all={"example.net": "carol"})
    assert r.has_recipient("whoever", "example.net")
    assert not r.has_recipient("whoever", "example.org")  # only for its domain
    assert deliver(tmp_path, r, "whoever@example.net", "else@example.net") == ["250 2.0.0 OK"] * 2
    assert count(tmp_path, "carol") == 1


def test_per_user_route_overrides_the_domain_default(tmp_path: Path) -> None:
    r = router(tmp_path, users={"bob@example.org": "archive", "dave": "archive"})
    assert r.has_recipient("dave", "example.net")  # a routed address is a known user
    assert (
        deliver(tmp_path, r, "bob@example.org", "bob@example.net", "dave@example.net")
        == ["250 2.0.0 OK"] * 3
    )
    assert (tmp_path / "mbox" / "example.org" / "bob").exists()
    assert (tmp_path / "mbox" / "example.net" / "dave").exists()
    assert count(tmp_path, "bob") == 1  # bob@example.net went to the default maildir


def test_per_domain_route(tmp_path: Path) -> None:
    r = router(tmp_path, domains={"lists.example.org": "archive"})
    assert r.is_local_domain("Lists.Example.org")
    deliver(tmp_path, r, "carol@lists.example.org", "carol@example.org")
    assert (tmp_path / "mbox" / "lists.example.org" / "carol").exists()
    assert count(tmp_path, "carol") == 1


@pytest.mark.parametrize(
    ("configured", "other"),
    [("bücher.example", "xn--bcher-kva.example"), ("xn--bcher-kva.example", "bücher.example")],
)
def test_an_internationalized_domain_is_local_in_both_spellings(
    tmp_path: Path, configured: str, other: str
) -> None:
    # SMTPUTF8 mail names the domain in U-labels, other mail must use A-labels
    # (RFC 5890): both reach the same mailbox, stored where the configuration says.
    r = router(
        tmp_path,
        local_domains=[configured],
        maildir_layout="domain/user",
        aliases={f"info@{other.upper()}": ["alice"]},
        catch_all={other: "bob"},
    )
    for spelling in (configured, other, other.upper(), "BÜCHER.example"):
        assert r.is_local_domain(spelling)
        assert r.has_recipient("alice", spelling)
    replies = deliver(tmp_path, r, f"alice@{configured}", f"Alice@{other}", f"info@{configured}",
                      f"someone@{other}")
    assert replies == ["250 2.0.0 OK"] * 4
    assert len(files(tmp_path / "md" / configured / "alice" / "new")) == 1  # one copy
    assert len(files(tmp_path / "md" / configured / "bob" / "new")) == 1
    assert not (tmp_path / "md" / other).exists()


def test_a_domain_is_not_another_by_idna2003_mapping(tmp_path: Path) -> None:
    # IDNA2003 maps ß to ss; under IDNA2008 straße.example is a domain of its own.
    r = router(tmp_path, local_domains=["straße.example"])
    assert r.is_local_domain("xn--strae-oqa.example")
    assert not r.is_local_domain("strasse.example")


def test_one_domain_configured_twice_with_different_routes_is_refused(tmp_path: Path) -> None:
    same = re.escape('delivery.domains."xn--bcher-kva.example": the same as '
                     'delivery.domains."bücher.example"')
    with pytest.raises(DeliveryConfigError, match=same):
        router(
            tmp_path,
            domains={"bücher.example": "archive", "xn--bcher-kva.example": LOCAL_DESTINATION},
        )
    twice = re.escape("delivery.users.Bob: the same as delivery.users.bob")
    with pytest.raises(DeliveryConfigError, match=twice):
        router(tmp_path, users={"bob": "archive", "Bob": LOCAL_DESTINATION})


def test_remote_recipients_need_a_relay(tmp_path: Path) -> None:
    r = router(tmp_path)
    assert not r.is_local_domain("elsewhere.test")
    assert not r.has_recipient("x", "elsewhere.test")
    assert not r.can_relay()
    assert deliver(tmp_path, r, "x@elsewhere.test") == [
        "550 5.4.4 No route to <x@elsewhere.test>: this server relays to no other domain"
    ]
    relayed = router(tmp_path, relay="archive", aliases={"fwd": ["Ext@Elsewhere.test"]})
    assert relayed.can_relay()
    assert deliver(tmp_path, relayed, "Y@elsewhere.test", "fwd@example.org") == ["250 2.0.0 OK"] * 2
    # remote local parts keep their case: only the remote side may fold it
    assert sorted(p.name for p in (tmp_path / "mbox" / "elsewhere.test").iterdir()) == ["Ext", "Y"]


def test_a_relayed_address_no_mailbox_can_be_named_after_is_refused_at_rcpt(
    tmp_path: Path,
) -> None:
    # Relayed into a mailbox we write (here an mbox per domain and user), ".." or a
    # "/" in the local part was 250 at RCPT and 451 after the data, for ever.
    relayed = router(tmp_path, relay="archive")
    trusted = Client(ip=ipaddress.ip_address("127.0.0.1"), trusted=True)
    step = RecipientStep(relayed, HOST, allow_loopback_literal=False)
    for local in ("..", "a/b"):
        rcpt = Recipient(Address(local, "elsewhere.test", quoted=True))
        verdict = asyncio.run(step.rcpt(trusted, Envelope(), rcpt))
        assert verdict.reply is not None
        assert (verdict.reply.code, verdict.reply.enhanced) == (553, "5.1.3")
    ok = asyncio.run(step.rcpt(trusted, Envelope(), Recipient(Address("y", "elsewhere.test"))))
    assert ok.reply is None


def test_local_domains_default_to_hostname_and_localhost(tmp_path: Path) -> None:
    r = router(tmp_path, local_domains=[])
    assert r.is_local_domain("MX.example.org") and r.is_local_domain("localhost")
    assert not r.is_local_domain("example.org")


def test_recipient_delimiter(tmp_path: Path) -> None:
    assert router(tmp_path, recipient_delimiter="-").has_recipient("alice-x", "example.org")
    assert router(tmp_path).has_recipient("alice+x", "example.org")
    assert not router(tmp_path, recipient_delimiter="").has_recipient("alice+x", "example.org")
    assert not router(tmp_path).has_recipient("+x", "example.org")


def test_system_users_are_local_users(tmp_path: Path) -> None:
    r = router(tmp_path, system_users=True, local_users=[])
    assert r.has_recipient("root", "example.org") and r.has_recipient("daemon", "example.org")


def test_a_failing_destination_fails_only_its_recipients(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the mbox directory should be")
    broken = DestinationConfig(mbox=MboxConfig(path=str(tmp_path / "blocked/{user}")))
    r = router(
        tmp_path,
        destinations={"broken": broken},
        users={"bob": "broken"},
        aliases={"both": ["alice", "bob"]},
    )
    replies = deliver(tmp_path, r, "alice@example.org", "bob@example.org", "both@example.org")
    assert replies[0] == "250 2.0.0 OK"
    assert replies[1].startswith("451 4.3.0")
    # "both" reached alice; its address bob failed, a recipient of its own
    assert replies[2] == "250 2.0.0 OK" and replies[3].startswith("451 4.3.0")
    assert count(tmp_path, "alice") == 1  # once, though two recipients lead there


def test_nesting_too_deep_is_a_local_error(tmp_path: Path) -> None:
    # RFC 3463 X.3.5: system incorrectly configured
    chain = {f"a{i}": [f"a{i + 1}"] for i in range(30)}
    r = router(tmp_path, aliases=chain)
    assert deliver(tmp_path, r, "a0@example.org")[0].startswith("451 4.3.5")
    # and so it is at RCPT: our configuration's fault is no "user unknown" (550 5.1.1)
    step = RecipientStep(r, HOST, allow_loopback_literal=False)
    who = Client(ip=ipaddress.ip_address("192.0.2.1"))
    verdict = asyncio.run(step.rcpt(who, Envelope(), Recipient(address("a0@example.org"))))
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.3.5")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"default": "nowhere"}, "default: no destination named 'nowhere'"),
        # the factory's own errors name the key in full, as the loader's do
        ({"users": {"a": "nowhere"}}, "users.a: no destination named"),
        ({"aliases": {"x": ["y@remote.test"]}}, r"^delivery\.aliases\.x: target y@remote.test"),
        ({"catch_all": {"remote.test": "alice"}},
         r'^delivery\.catch_all\."remote\.test": not a local domain'),
        # refused at RCPT as "user unknown" before, while an alias to it was refused here
        ({"catch_all": {"example.org": "x@remote.test"}},
         r'^delivery\.catch_all\."example\.org": target x@remote.test is in a remote domain'),
        ({"recipient_delimiter": "@"}, "recipient_delimiter"),
    ],
)
def test_configuration_mistakes_are_named(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        router(tmp_path, **changes)


def test_a_missing_destination_module_fails_the_check_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(factory.PLUGGED_TYPES, "pipe", ("mailgate.delivery.no_such", "Pipe"))
    pipe = DestinationConfig(pipe=PipeConfig(command=["/bin/cat"]))
    with pytest.raises(DeliveryConfigError,
                       match=r"^delivery\.destinations\.lists: type 'pipe' is not"):
        router(tmp_path, destinations={"lists": pipe})


def test_destination_config_type_comes_from_its_sub_table() -> None:
    assert DestinationConfig(lmtp=LMTPConfig("unix:/run/lmtp")).type == "lmtp"
    assert DestinationConfig(type="mbox").mbox == MboxConfig()
    with pytest.raises(ValueError, match="needs its"):
        DestinationConfig(type="pipe")
    with pytest.raises(ValueError, match="exactly one"):
        DestinationConfig(pipe=PipeConfig(["x"]), lmtp=LMTPConfig("h:1"))
    with pytest.raises(ValueError, match="do not match"):
        DestinationConfig(type="mbox", pipe=PipeConfig(["x"]))
    with pytest.raises(ValueError, match=r"^path: only \{user\} and \{domain\}"):
        MboxConfig(path="/var/mail/{uid}")


def test_routes_are_remembered_but_never_shared_as_lists(tmp_path: Path) -> None:
    r = router(tmp_path, aliases={"team": ["alice", "bob"]})
    first = r.route(address("team@example.org"))
    assert isinstance(first, list)
    first.clear()  # a caller's list is its own
    again = r.route(address("team@example.org"))
    assert isinstance(again, list) and [t.address.local for t in again] == ["alice", "bob"]
    assert deliver(tmp_path, r, "team@example.org") == ["250 2.0.0 OK"]
    assert count(tmp_path, "alice") == count(tmp_path, "bob") == 1


def test_the_route_memory_is_bounded(tmp_path: Path) -> None:
    r = router(tmp_path, catch_all={"example.org": "alice"})
    for i in range(ROUTE_CACHE_SIZE + 10):
        assert r.has_recipient(f"user{i}", "example.org")
    assert len(r._routes) == ROUTE_CACHE_SIZE
    assert r.has_recipient("user0", "example.org")  # forgotten, then found again


def test_a_configuration_error_is_logged_at_every_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain = {f"a{i}": [f"a{i + 1}"] for i in range(30)}
    r = router(tmp_path, aliases=chain)
    with caplog.at_level(logging.ERROR, logger="mailgate.delivery.router"):
        for _ in range(2):
            assert deliver(tmp_path, r, "a0@example.org")[0].startswith("451 4.3.5")
    assert len([rec for rec in caplog.records if "nest deeper" in rec.getMessage()]) == 2


class _Verifying:
    """A destination whose downstream knows only alice, and cannot say for carol."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def deliver(self, *args: Any) -> list[Any]:
        raise AssertionError("not delivered to in this test")

    async def verify_recipient(self, address: Address) -> bool | None:
        self.asked.append(address.local)
        return {"alice": True, "carol": None}.get(address.local, False)


def test_verify_recipient_asks_only_downstreams_that_can_tell(tmp_path: Path) -> None:
    verifying = _Verifying()
    table = RoutingTable(
        postmaster_domain="example.org",
        local_domains={"example.org": "example.org"},
        default="blackhole",
        users={"alice": "lmtp", "bob": "lmtp", "carol": "lmtp"},
        aliases={"both": ("alice", "dave")},
    )
    r = Router(table, {"blackhole": DiscardDestination(), "lmtp": verifying})

    def verify(local: str, domain: str = "example.org") -> bool | None:
        return asyncio.run(r.verify_recipient(local, domain))

    assert verify("alice") is True
    assert verify("bob") is False
    assert verify("carol") is None
    assert verify("dave") is True  # the discard destination cannot tell
    assert verify("both") is True
    assert verify("x", "remote.test") is False  # no relay: refused before any downstream
    assert verifying.asked == ["alice", "bob", "carol", "alice"]


def test_an_alias_is_refused_at_rcpt_only_when_every_address_is() -> None:
    # One dead address on a list must not make the list "user unknown" for everyone
    # who writes to it: it fails by itself at delivery, reported with the alias.
    verifying = _Verifying()
    table = RoutingTable(
        postmaster_domain="example.org",
        local_domains={"example.org": "example.org"},
        default="blackhole",
        users={"alice": "lmtp", "bob": "lmtp", "bobby": "lmtp", "carol": "lmtp"},
        aliases={"half": ("bob", "alice"), "dead": ("bob", "bobby"), "unsure": ("bob", "carol")},
    )
    r = Router(table, {"blackhole": DiscardDestination(), "lmtp": verifying})

    def verify(local: str) -> bool | Reply | None:
        return asyncio.run(r.verify_recipient(local, "example.org"))

    assert verify("half") is True
    assert verify("dead") is False
    assert verify("unsure") is None  # carol's downstream could not say: 4xx for now


def test_a_lone_recipient_gets_its_destinations_answer(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the mbox directory should be")
    broken = DestinationConfig(mbox=MboxConfig(path=str(tmp_path / "blocked/{user}")))
    r = router(tmp_path, destinations={"broken": broken}, users={"bob": "broken"})
    assert deliver(tmp_path, r, "bob@example.org")[0].startswith("451 4.3.0")
    assert deliver(tmp_path, r, "Alice+news@example.org") == ["250 2.0.0 OK"]
    assert deliver(tmp_path, r, "nobody@example.org")[0].startswith("550 5.1.1")
    assert count(tmp_path, "alice") == 1


class _Recording:
    """A destination that stores nothing and notes the NOTIFY each address got."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    async def deliver(self, env: Any, trace: Any, spool: Any, recipients: list[Any]) -> list[Any]:
        self.seen += [(str(r.address), r.notify) for r in recipients]
        return [RecipientResult(r, reply("ok")) for r in recipients]


def test_an_expanded_alias_is_reported_once(tmp_path: Path) -> None:
    # RFC 3461 6.2.7.3: "expanded" for the alias, and its addresses lose SUCCESS
    # (a downstream given NOTIFY=SUCCESS would report each of them again).
    r = router(tmp_path, aliases={"team": ["alice", "bob"], "solo": ["carol"]})
    recording = _Recording()
    r.destinations[LOCAL_DESTINATION] = recording  # type: ignore[assignment]
    rcpts = [
        Recipient(Address("team", "example.org"), ("SUCCESS", "FAILURE")),
        Recipient(Address("solo", "example.org"), ("SUCCESS",)),
        Recipient(Address("root", "example.org"), ("SUCCESS",)),
    ]
    env = Envelope(sender=Address("s", "example.net"), recipients=rcpts)
    results = asyncio.run(r.deliver(env, TRACE, spooled(tmp_path, MESSAGE, env)))
    assert [res.action for res in results] == ["expanded", "delivered", "delivered"]
    assert sorted(recording.seen) == [
        ("alice@example.org", ("FAILURE",)),
        ("bob@example.org", ("FAILURE",)),
        ("carol@example.org", ("SUCCESS",)),
        ("root@example.org", ("SUCCESS",)),
    ]
    only_success = Recipient(Address("team", "example.org"), ("SUCCESS",))
    recording.seen.clear()
    env = Envelope(sender=Address("s", "example.net"), recipients=[only_success])
    asyncio.run(r.deliver(env, TRACE, spooled(tmp_path / "2", MESSAGE, env)))
    assert {notify for _, notify in recording.seen} == {("NEVER",)}


def test_a_domain_without_a_postmaster_mailbox_is_named(tmp_path: Path) -> None:
    # RFC 5321 4.5.1: postmaster MUST exist in every domain we take mail for; the
    # built-in postmaster -> root has no mailbox where root is no local user
    assert router(tmp_path).postmaster_problems() == []
    without_root = router(tmp_path, local_users=["alice"])
    assert without_root.postmaster_problems() == [
        f"postmaster@{domain} cannot be delivered (RFC 5321 4.5.1 requires it): "
        'add an alias, e.g. [delivery.aliases] postmaster = "you"'
        for domain in ("example.org", "example.net")
    ]
    aliased = router(tmp_path, local_users=["alice"], aliases={"postmaster": ["alice"]})
    assert aliased.postmaster_problems() == []


def test_an_alias_with_a_dead_address_delivers_to_the_others(tmp_path: Path) -> None:
    # A typo or a user gone must not make a list "user unknown" to everyone who
    # writes to it, nor postmaster (RFC 5321 4.5.1) where the site aliased it
    r = router(tmp_path, aliases={"sales": ["alice", "ghost"], "postmaster": ["bob", "ghost"],
                                  "dead": ["ghost", "nobody@example.net"]})
    assert deliver(tmp_path, r, "sales@example.org", "postmaster@example.org") == [
        "250 2.0.0 OK"] * 2
    assert (count(tmp_path, "alice"), count(tmp_path, "bob")) == (1, 1)
    assert r.has_recipient("postmaster", "") and r.has_recipient("sales", "example.net")
    # every address dead: refused as before, naming the address the client gave
    assert str(r.route(address("dead@example.org"))).startswith("550 5.1.1 <dead@example.org>")
    assert r.postmaster_problems() == []


def test_aliases_and_catch_alls_that_lead_nowhere_are_named(tmp_path: Path) -> None:
    aliases = {"sales": ["alice", "ghost"], "team@example.net": ["bob"],
               "postmaster": ["ghost"], "info": ["alice@example.net", "x@example.org"]}
    r = router(tmp_path, local_users=["alice"], aliases=aliases,
               catch_all={"example.org": "nobody"})
    assert r.alias_problems() == [
        "delivery.aliases.postmaster: ghost is no mailbox here: mail to the alias skips it",
        "delivery.aliases.sales: ghost is no mailbox here: mail to the alias skips it",
        'delivery.aliases."team@example.net": bob is no mailbox here: mail to the alias skips it',
        # x@example.org goes to the catch-all, which has no mailbox either
        "delivery.aliases.info: x@example.org is no mailbox here: mail to the alias skips it",
        'delivery.catch_all."example.org": nobody is no mailbox here: the catch-all takes '
        "nothing",
    ]
    # an unqualified alias holds in each local domain: ghost is alice's in example.net
    caught = router(tmp_path, local_users=["alice"], aliases={"sales": ["alice", "ghost"]},
                    catch_all={"example.net": "alice"})
    assert caught.alias_problems() == [
        "delivery.aliases.sales: ghost is no mailbox here in example.org: mail to the alias "
        "skips it"
    ]
    # the site's own postmaster alias is named, not "add an alias"
    assert r.postmaster_problems() == [
        f"postmaster@{domain} cannot be delivered (RFC 5321 4.5.1 requires it): no address "
        "of delivery.aliases.postmaster is a mailbox here"
        for domain in ("example.org", "example.net")
    ]
    # the built-in postmaster -> root is no alias of the site's: only the hint to add one
    assert router(tmp_path, local_users=["alice"]).alias_problems() == []


def test_a_local_user_named_postmaster_gets_postmasters_mail(tmp_path: Path) -> None:
    # The built-in postmaster -> root alias is for sites without a postmaster of their
    # own: it hid a local user of that name (and a route of its own), which made the
    # <Postmaster> RFC 5321 4.5.1 requires "user unknown".
    r = router(tmp_path, local_users=["alice", "postmaster"])
    assert r.postmaster_problems() == []
    deliver(tmp_path, r, "postmaster@example.org", "postmaster")
    assert (count(tmp_path, "postmaster"), count(tmp_path, "root")) == (1, 0)  # one message
    routed = router(tmp_path, local_users=["alice"], users={"postmaster@example.org": "local"})
    assert [t.address.local for t in routed.route(address("postmaster@example.org"))] == [
        "postmaster"
    ]


def test_a_configured_name_with_the_delimiter_in_it_is_found_whole(tmp_path: Path) -> None:
    # with "-" as the delimiter, john-smith was looked up as john (550) and the
    # alias mailer-daemon as mailer; the whole local part now comes first
    r = router(tmp_path, recipient_delimiter="-+", local_users=["john-smith", "alice", "bob"],
               aliases={"mailer-daemon": ["alice"], "alice+spam": ["bob"]})

    def box(text: str) -> list[str]:
        found = r.route(address(text))
        assert isinstance(found, list), (text, found)
        return [str(t.address) for t in found]

    assert box("john-smith@example.org") == ["john-smith@example.org"]
    assert box("mailer-daemon@example.org") == ["alice@example.org"]
    assert box("alice+spam@example.org") == ["bob@example.org"]
    assert box("alice-lists@example.org") == ["alice@example.org"]  # a detail still goes


class _Answering:
    """A destination that answers each address as told (250 for the others)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    async def deliver(self, env: Any, trace: Any, spool: Any, recipients: list[Any]) -> list[Any]:
        return [
            RecipientResult(r, reply(self.answers.get(r.address.local, "ok"), address="x"))
            for r in recipients
        ]


def test_each_address_of_an_expanded_alias_keeps_its_own_outcome(tmp_path: Path) -> None:
    # team -> alice (stored), bob (mailbox full for now), carol (refused for good): a
    # single worst reply for "team" lost bob's copy (a 550 is not retried) and named
    # the alias, not carol, in the report.
    r = router(tmp_path, aliases={"team": ["alice", "bob", "carol"], "two": ["alice", "carol"]})
    r.destinations[LOCAL_DESTINATION] = _Answering(  # type: ignore[assignment]
        {"bob": "delivery.downstream_temp", "carol": "rcpt.unknown"}
    )
    team = Recipient(Address("team", "example.org"), ("FAILURE",))
    env = Envelope(sender=Address("s", "example.net"), recipients=[team])
    results = asyncio.run(r.deliver(env, TRACE, spooled(tmp_path, MESSAGE, env)))
    assert [(str(x.recipient.address), x.reply.code, x.action) for x in results] == [
        ("team@example.org", 250, "expanded"),
        ("bob@example.org", 451, "delivered"),
        ("carol@example.org", 550, "delivered"),
    ]
    assert {x.recipient.orcpt for x in results[1:]} == {"rfc822;team@example.org"}
    assert results[1].recipient.notify == ("FAILURE",)
    # without a temporary failure: the alias has it, carol is a recipient of her own
    env = Envelope(sender=Address("s", "example.net"),
                   recipients=[Recipient(Address("two", "example.org"), (), "rfc822;x@y.org")])
    results = asyncio.run(r.deliver(env, TRACE, spooled(tmp_path / "2", MESSAGE, env)))
    assert [(str(x.recipient.address), x.reply.code) for x in results] == [
        ("two@example.org", 250), ("carol@example.org", 550)]
    assert results[1].recipient.orcpt == "rfc822;x@y.org"  # the sender's own ORCPT kept
    # every address failed: each is named, none is counted as the alias's success
    r.destinations[LOCAL_DESTINATION] = _Answering(  # type: ignore[assignment]
        {"alice": "rcpt.unknown", "carol": "rcpt.unknown"}
    )
    env = Envelope(sender=Address("s", "example.net"),
                   recipients=[Recipient(Address("two", "example.org"))])
    results = asyncio.run(r.deliver(env, TRACE, spooled(tmp_path / "3", MESSAGE, env)))
    assert [(str(x.recipient.address), x.reply.code) for x in results] == [
        ("alice@example.org", 550), ("carol@example.org", 550)]


def test_bare_postmaster_is_known_where_the_host_name_is_no_local_domain(tmp_path: Path) -> None:
    # RFC 5321 4.5.1: RCPT TO:<Postmaster> MUST be taken; mx.example.org takes mail for
    # example.org only (the shipped example), and <Postmaster> is postmaster@example.org
    r = router(tmp_path)
    assert not r.is_local_domain(HOST)
    assert r.has_recipient("postmaster", "")
    assert not router(tmp_path / "2", local_users=["alice"]).has_recipient("postmaster", "")


class _ReportingDownstream:
    """A destination that was handed the DSN parameters (it reports successes itself)."""

    def __init__(self) -> None:
        self.handed: list[Recipient] = []

    async def deliver(self, env: Any, trace: Any, spool: Any, recipients: list[Any]) -> list[Any]:
        self.handed += recipients
        return [RecipientResult(r, reply("ok"), "") for r in recipients]


def test_two_rcpts_of_one_mailbox_hand_on_what_either_asked_for(tmp_path: Path) -> None:
    # alice and alice+tag are one mailbox: the downstream gets one RCPT, which carried
    # only the first one's NOTIFY and ORCPT (the second's SUCCESS, its ORCPT and a
    # FAILURE it asked for were lost where the downstream reports)
    r = router(tmp_path, recipient_delimiter="+")
    downstream = _ReportingDownstream()
    r.destinations[LOCAL_DESTINATION] = downstream  # type: ignore[assignment]
    env = Envelope(sender=Address("s", "example.net"), recipients=[
        Recipient(Address("alice", "example.org"), ("NEVER",)),
        Recipient(Address("alice+tag", "example.org"), ("SUCCESS", "FAILURE"),
                  "rfc822;alice+tag@example.org"),
    ])
    results = asyncio.run(r.deliver(env, TRACE, spooled(tmp_path, MESSAGE, env)))
    [handed] = downstream.handed
    assert handed.notify == ("SUCCESS", "FAILURE")
    assert handed.orcpt == "rfc822;alice+tag@example.org"
    assert [x.action for x in results] == ["", ""]  # (the downstream reports, not we)
    # no NOTIFY is FAILURE,DELAY (RFC 3461 4.1); NEVER stays only when both said it
    for first, second, merged in [
        ((), ("SUCCESS",), ("SUCCESS", "FAILURE", "DELAY")),
        (("NEVER",), ("NEVER",), ("NEVER",)),
        (("NEVER",), (), ("FAILURE", "DELAY")),
    ]:
        downstream.handed.clear()
        env = Envelope(sender=Address("s", "example.net"), recipients=[
            Recipient(Address("alice", "example.org"), first),
            Recipient(Address("alice+x", "example.org"), second),
        ])
        asyncio.run(r.deliver(env, TRACE, spooled(tmp_path / str(merged), MESSAGE, env)))
        assert [h.notify for h in downstream.handed] == [merged]


def test_mailboxes_are_not_written_when_a_hand_off_deferred(tmp_path: Path) -> None:
    # alice's maildir and bob's smarthost (down): the message is answered 451 and comes
    # again whole, so alice's copy now would be a duplicate then (one per retry)
    handoff = DestinationConfig(pipe=PipeConfig(command=["/bin/true"]))
    r = router(tmp_path, destinations={"handoff": handoff}, users={"bob": "handoff"})
    r.destinations["handoff"] = _Answering(  # type: ignore[assignment]
        {"bob": "delivery.downstream_temp"}
    )
    replies = deliver(tmp_path, r, "alice@example.org", "bob@example.org")
    assert replies[0].startswith("451 4.3.0 Not passed on now")
    assert replies[1].startswith("451 4.4.0")
    assert count(tmp_path, "alice") == 0
    # when it goes through, both have it
    r.destinations["handoff"] = _Answering({})  # type: ignore[assignment]
    assert deliver(tmp_path, r, "alice@example.org", "bob@example.org") == ["250 2.0.0 OK"] * 2
    assert count(tmp_path, "alice") == 1


def test_a_recipient_handed_on_keeps_its_detail(tmp_path: Path) -> None:
    # alice+lists reached Dovecot as alice: its lists folder and Sieve never saw it
    handoff = DestinationConfig(lmtp=LMTPConfig(address="127.0.0.1:24"))
    r = router(tmp_path, destinations={"handoff": handoff}, users={"alice": "handoff"},
               aliases={"team": ["alice"]})
    recording = _Recording()
    r.destinations["handoff"] = recording  # type: ignore[assignment]
    env = Envelope(sender=Address("s", "example.net"), recipients=[
        Recipient(Address("Alice+Lists", "example.org")),
        Recipient(Address("team+x", "example.org")),
        Recipient(Address("bob+news", "example.org")),  # a maildir of ours: bob's own
    ])
    asyncio.run(r.deliver(env, TRACE, spooled(tmp_path, MESSAGE, env)))
    assert sorted(address for address, _ in recording.seen) == [
        "alice+Lists@example.org", "alice@example.org"]
    assert count(tmp_path, "bob") == 1


def test_a_result_for_another_recipient_keeps_every_other_field() -> None:
    # for_recipient copies by hand (replace() was measurable on the way to each 250):
    # a field added to RecipientResult must be added there too
    assert [f.name for f in dataclasses.fields(RecipientResult)] == [
        "recipient", "reply", "action", "remote_mta", "remote_reply"
    ]
    result = RecipientResult(Recipient(Address("a", "example.org"), ("SUCCESS",)),
                             reply("delivery.downstream_perm"), "relayed", "mx.next", "550 no")
    other = Recipient(Address("b", "example.org"))
    assert result.for_recipient(other) == dataclasses.replace(result, recipient=other)
