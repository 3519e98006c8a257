"""Builds the router and its destinations from the [delivery] section.

Destination types are a registry: "maildir", "mbox" and "discard" (a black hole) are
built in; "pipe", "lmtp" and "smtp" are classes in their own modules, imported only
when a configuration uses them, so a missing or broken module fails the configuration
check with a message naming the destination rather than at the first delivery.
"""

from __future__ import annotations

import importlib
import inspect
import pwd
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from mailgate.config.delivery import (
    LOCAL_DESTINATION,
    DeliveryConfig,
    DestinationConfig,
)
from mailgate.config.names import dotted_key
from mailgate.delivery.base import Destination
from mailgate.delivery.discard import DiscardDestination
from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.maildir import MaildirDestination
from mailgate.delivery.mbox import MboxDestination
from mailgate.delivery.router import Router, RoutingTable
from mailgate.protocol.idn import domain_key

V = TypeVar("V")


class DeliveryConfigError(ValueError):
    """The [delivery] section cannot be put to work; the message names the key."""


# type → (module, class): constructed with the type's config dataclass (and the server
# hostname, when the constructor takes a ``hostname`` argument)
PLUGGED_TYPES: dict[str, tuple[str, str]] = {
    "pipe": ("mailgate.delivery.pipe", "PipeDestination"),
    "lmtp": ("mailgate.delivery.lmtp", "LMTPDestination"),
    "smtp": ("mailgate.delivery.smarthost", "SmarthostDestination"),
}
# destinations that store into mailboxes, so they take only known users
MAILBOX_TYPES = frozenset({"maildir", "mbox"})


def build_router(config: DeliveryConfig, hostname: str) -> Router:
    """The router for ``config``; raises DeliveryConfigError when it cannot work."""
    hostname = hostname.lower().rstrip(".")
    configs = {LOCAL_DESTINATION: DestinationConfig(type="maildir"), **config.destinations}
    # one for all maildirs: their fsyncs share passes
    committer = GroupCommitter(config.sync_method)
    destinations = {
        name: _build(name, dc, config, hostname, committer) for name, dc in configs.items()
    }
    listed = [d.lower().rstrip(".") for d in config.local_domains] or [hostname, "localhost"]
    # each local domain once, spelled as first configured (U-labels or A-labels)
    spellings: dict[str, str] = {}
    for name in (*listed, *(d.lower() for d in config.domains)):
        spellings.setdefault(domain_key(name), name)

    def domain(name: str) -> str:
        return spellings.get(domain_key(name), name.lower())

    def address(key: str) -> str:  # user or user@domain
        user, at, name = key.lower().rpartition("@")
        return f"{user}@{domain(name)}" if at else key.lower()

    users = set(config.local_users)
    if config.system_users:
        users |= {entry.pw_name for entry in pwd.getpwall()}
    # RFC 5321 4.5.1: postmaster must exist; root's unless the site has a postmaster
    # of its own (a local user, or a route of its own: an alias would hide either)
    own = {u.lower() for u in users} | {k.lower().rpartition("@")[0] or k.lower()
                                        for k in config.users}
    aliases = {} if "postmaster" in own else {"postmaster": ("root",)}
    configured = _keyed(
        "delivery.aliases", {k: tuple(v) for k, v in config.aliases.items()}, address
    )
    builtin = frozenset(aliases) - frozenset(configured)
    aliases |= configured
    table = RoutingTable(
        postmaster_domain=spellings.get(domain_key(hostname), listed[0]),
        local_domains=spellings,
        default=config.default,
        local_users=frozenset(u.lower() for u in users),
        relay=config.relay,
        delimiter=config.recipient_delimiter,
        aliases=aliases,
        builtin_aliases=builtin,
        users=_keyed("delivery.users", config.users, address),
        domains=_keyed("delivery.domains", config.domains, domain),
        catch_all=_keyed("delivery.catch_all", config.catch_all, domain),
        mailbox_destinations=frozenset(n for n, dc in configs.items() if dc.type in MAILBOX_TYPES),
    )
    _check(table, configs)
    return Router(table, destinations)


def _build(
    name: str,
    dc: DestinationConfig,
    config: DeliveryConfig,
    hostname: str,
    committer: GroupCommitter,
) -> Destination:
    if dc.type == "maildir" and dc.maildir is not None:
        root = dc.maildir.root or config.maildir_root
        layout = dc.maildir.layout or config.maildir_layout
        return MaildirDestination(root, layout, hostname, committer)
    if dc.type == "mbox" and dc.mbox is not None:
        return MboxDestination(dc.mbox)
    if dc.type == "discard":
        return DiscardDestination()
    if dc.type not in PLUGGED_TYPES:
        raise DeliveryConfigError(f"delivery.destinations.{name}.type: unknown type {dc.type!r}")
    cls = _load(name, dc.type)
    kwargs = {"hostname": hostname} if "hostname" in _parameters(cls) else {}
    try:
        return cls(getattr(dc, dc.type), **kwargs)
    except (ValueError, TypeError, OSError) as exc:
        # "command: must name a program" -> delivery.destinations.x.pipe.command: ...
        where = f"delivery.destinations.{name}.{dc.type}"
        said = str(exc)
        sep = "." if re.match(r"\w+: ", said) else ": "
        raise DeliveryConfigError(f"{where}{sep}{said}") from exc


def _load(name: str, kind: str) -> Callable[..., Destination]:
    module_name, class_name = PLUGGED_TYPES[kind]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise DeliveryConfigError(
            f"delivery.destinations.{name}: type {kind!r} is not available "
            f"({module_name}.{class_name}: {exc})"
        ) from exc


def _parameters(cls: Callable[..., object]) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def _keyed(section: str, rules: Mapping[str, V], normal: Callable[[str], str]) -> dict[str, V]:
    """``rules`` under their keys' lookup form; two keys that are one (``Info`` and
    ``info``, or one domain spelled with U-labels and with A-labels) are refused
    rather than one of them silently dropped."""
    keyed: dict[str, V] = {}
    first: dict[str, str] = {}
    for key, value in rules.items():
        normalized = normal(key)
        if normalized in keyed and keyed[normalized] != value:
            raise DeliveryConfigError(
                f"{dotted_key(section, key)}: the same as "
                f"{dotted_key(section, first[normalized])}, with another value"
            )
        keyed[normalized] = value
        first.setdefault(normalized, key)
    return keyed


def _check(table: RoutingTable, configs: dict[str, DestinationConfig]) -> None:
    """Refuse rules that can never work, naming the key."""
    if table.default not in configs:
        raise DeliveryConfigError(f"delivery.default: no destination named {table.default!r}")
    if table.relay and table.relay not in configs:
        raise DeliveryConfigError(f"delivery.relay: no destination named {table.relay!r}")
    def check_target(key: str, target: str) -> None:
        domain = target.rpartition("@")[2].lower() if "@" in target else ""
        if domain and domain_key(domain) not in table.local_domains and not table.relay:
            raise DeliveryConfigError(
                f"{key}: target {target} is in a remote domain and no relay is set"
            )

    for key, targets in table.aliases.items():
        for target in targets:
            check_target(dotted_key("delivery.aliases", key), target)
    for domain, target in table.catch_all.items():
        if domain_key(domain) not in table.local_domains:
            raise DeliveryConfigError(
                f"{dotted_key('delivery.catch_all', domain)}: not a local domain")
        check_target(dotted_key("delivery.catch_all", domain), target)
