"""The [delivery] section: destinations and routing.

A recipient in a local domain is routed, in this order:

1. ``aliases`` expand it (recursively) into other addresses;
2. ``users`` send one address (or one user name in every local domain) to a named
   destination;
3. ``domains`` send a whole domain to a named destination;
4. otherwise it goes to ``default`` (the built-in Maildir store ``local``).

A recipient in any other domain goes to ``relay`` when one is set (policy lets only
authenticated or trusted clients relay), and is refused otherwise.

Example::

    [delivery]
    maildir_root = "/var/mail/maildir"
    local_domains = ["example.org", "example.net"]
    local_users = ["alice", "bob"]
    relay = "outbound"
    catch_all = { "example.net" = "alice" }

    [delivery.aliases]
    postmaster = ["root", "alice"]
    "sales@example.org" = ["alice", "bob@example.org"]

    [delivery.users]
    "archive@example.org" = "archive"

    [delivery.domains]
    "lists.example.org" = "lists"

    [delivery.destinations.archive.mbox]
    path = "/var/mail/archive/{user}"

    [delivery.destinations.lists.pipe]
    command = ["/usr/lib/mailman/mail/mailman", "post"]

    [delivery.destinations.outbound.smtp]
    host = "smarthost.example.net"
    port = 587
"""

from __future__ import annotations

import platform
import re
import string
from dataclasses import dataclass, field
from typing import Literal

from mailgate.config.names import domain_problem, dotted_key

# a configured user name: no space, control character or address punctuation
_USER = re.compile(r'[^\s@"<>()\[\],;:\\]+\Z')


def address_problem(text: str) -> str | None:
    """Why ``text`` is neither a user name nor ``user@domain``, or None."""
    local, at, domain = text.rpartition("@") if "@" in text else (text, "", "")
    if not _USER.match(local) or not local.isprintable():
        return f"{text!r} is not a user name or an address"
    if at:
        problem = domain_problem(domain, idna=True)
        if problem:
            return f"{text!r}: {problem}"
    return None

DestinationType = Literal["maildir", "mbox", "pipe", "lmtp", "smtp", "discard"]
MaildirLayout = Literal["user", "domain/user"]
# how concurrent deliveries' files are made durable: an fsync each, or one syncfs(2)
# per file system and pass of the group commit (see mailgate/delivery/fsync.py)
SyncMethod = Literal["fsync", "syncfs"]
SYNCFS_KERNEL = (5, 8)  # the first Linux whose syncfs reports write errors


def syncfs_problem(system: str, release: str) -> str | None:
    """Why sync_method = "syncfs" cannot be trusted on this kernel, or None."""
    if system != "Linux":
        return f"syncfs is Linux's; this system is {system}"
    numbers = re.match(r"(\d+)\.(\d+)", release)
    if numbers is None or (int(numbers[1]), int(numbers[2])) < SYNCFS_KERNEL:
        return (f"syncfs reports write errors only from Linux 5.8 (this kernel is "
                f"{release}): a failed write would be answered 250; use \"fsync\"")
    return None

# The name of the built-in Maildir destination under ``maildir_root``.
LOCAL_DESTINATION = "local"


@dataclass
class MaildirConfig:
    """A Maildir store: one maildir per recipient under ``root``."""

    root: str = ""  # empty: [delivery] maildir_root
    layout: MaildirLayout | Literal[""] = ""  # empty: [delivery] maildir_layout


@dataclass
class MboxConfig:
    """An mbox file per recipient, mboxrd quoting, flock plus a <path>.lock dotlock."""

    # {user} is the recipient's local part (lower case, +detail removed), {domain} its
    # domain; a fixed path without placeholders collects every recipient's mail.
    path: str = "/var/mail/{user}"
    lock_timeout: float = 30.0  # seconds to wait for the locks before 450 4.2.0
    stale_lock_age: float = 300.0  # a dotlock older than this (seconds) is broken

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        try:
            fields = [
                (name, spec, conversion)
                for _, name, spec, conversion in string.Formatter().parse(self.path)
                if name is not None
            ]
        except ValueError as exc:  # an unmatched brace
            raise ValueError(f"path: only {{user}} and {{domain}} may appear ({exc})") from exc
        for name, spec, conversion in fields:
            # ("{user.__class__}", "{user!r}", "{user:>99999}" are valid for format())
            if name not in ("user", "domain") or spec or conversion:
                shown = "{" + name + (f"!{conversion}" if conversion else "") + (
                    f":{spec}" if spec else "") + "}"
                raise ValueError(
                    f"path: only {{user}} and {{domain}} may appear, not {shown[:60]}"
                )
        for key, value in (("lock_timeout", self.lock_timeout),
                           ("stale_lock_age", self.stale_lock_age)):
            if not value > 0:
                raise ValueError(f"{key}: must be a positive number of seconds, not {value}")


@dataclass
class PipeConfig:
    """Hand the message to a mailer command on its standard input (upas style)."""

    command: list[str]  # argv; no shell is involved
    timeout: float = 60  # seconds before the command is killed (451 4.3.0)
    refused_pattern: str = "mail refused"  # in its stderr with a failure exit: 554 5.6.0


@dataclass
class LMTPConfig:
    """Hand the message to an LMTP server (RFC 2033), e.g. Dovecot."""

    address: str  # "host:port" or "unix:/path/to/socket"
    timeout: float = 60  # seconds per LMTP command


@dataclass
class SmtpConfig:
    """Forward the message to a smarthost by SMTP."""

    host: str
    port: int = 25
    starttls: Literal["require", "opportunistic", "off"] = "require"
    timeout: float = 60  # seconds per SMTP command
    cafile: str = ""  # empty: the system's CA certificates
    username: str = ""  # empty: no AUTH
    password_file: str = ""  # a file holding the AUTH password (not the password itself)

    def __post_init__(self) -> None:
        # (each message would otherwise meet a 451 at the first connection)
        if not self.host.strip():
            raise ValueError("host: must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: must be from 1 to 65535, got {self.port}")
        if self.username and not self.password_file:
            raise ValueError("username: AUTH needs password_file too")


@dataclass
class DestinationConfig:
    """One named destination: its type and that type's sub-table.

    Written as ``[delivery.destinations.NAME.TYPE]`` with the type's keys; ``type``
    may then be left out.  A maildir or mbox destination with all defaults can be
    written as ``[delivery.destinations.NAME]`` with ``type = "mbox"``.  ``type =
    "discard"`` (no sub-table) accepts mail and throws it away: spam traps, benchmarks.
    """

    type: DestinationType | Literal[""] = ""  # empty: the one sub-table given
    maildir: MaildirConfig | None = None
    mbox: MboxConfig | None = None
    pipe: PipeConfig | None = None
    lmtp: LMTPConfig | None = None
    smtp: SmtpConfig | None = None

    def __post_init__(self) -> None:
        given = [name for name in _SUB_TABLES if getattr(self, name) is not None]
        if not self.type:
            if len(given) != 1:
                raise ValueError(
                    "destination: give exactly one of the sub-tables "
                    f"{', '.join(_SUB_TABLES)} (or a type)"
                )
            self.type = given[0]  # type: ignore[assignment]
        if self.type not in (*_SUB_TABLES, "discard"):
            raise ValueError(f"destination.type: unknown type {self.type!r}")
        if any(name != self.type for name in given):
            raise ValueError(f"destination: sub-tables {given} do not match type {self.type!r}")
        if self.type == "discard":  # a black hole: nothing to configure
            return
        if self.type == "maildir" and self.maildir is None:
            self.maildir = MaildirConfig()
        elif self.type == "mbox" and self.mbox is None:
            self.mbox = MboxConfig()
        elif getattr(self, self.type) is None:
            raise ValueError(f"destination: type {self.type!r} needs its [{self.type}] sub-table")


_SUB_TABLES = ("maildir", "mbox", "pipe", "lmtp", "smtp")


@dataclass
class DeliveryConfig:
    maildir_root: str = "maildir"  # the built-in "local" destination's maildirs
    maildir_layout: MaildirLayout = "user"  # root/<user>/ or root/<domain>/<user>/
    # "fsync": each file and directory of concurrent deliveries is fsync'ed (in shared
    # passes); "syncfs": one syncfs(2) per file system and pass instead, far cheaper
    # under load but it also writes out other programs' data on that file system
    sync_method: SyncMethod = "fsync"
    local_domains: list[str] = field(default_factory=list)  # empty: hostname and localhost
    # the destination for local recipients no other rule routes: "local" is the built-in
    # Maildir store under maildir_root (unless [delivery.destinations.local] redefines it)
    default: str = LOCAL_DESTINATION
    # the destination for recipients in other domains (policy allows that only to
    # authenticated or trusted clients); empty: such recipients are refused at RCPT
    relay: str = ""
    # characters that start a +detail suffix ignored for lookup (alice+lists → alice);
    # empty: no detail suffixes
    recipient_delimiter: str = "+"
    system_users: bool = True  # the system's accounts (the passwd database) are local users
    local_users: list[str] = field(default_factory=list)  # more local users (mailbox names)
    # alias → target addresses; a key without @ applies in every local domain, a target
    # without @ is in the alias's domain; expanded recursively (an address already being
    # expanded is delivered as a mailbox, which stops loops).  postmaster → root is built in.
    # (a single target may be written as a string: postmaster = "alice")
    aliases: dict[str, list[str] | str] = field(default_factory=dict)
    # address (or user name in every local domain) → destination name
    users: dict[str, str] = field(default_factory=dict)
    # domain → destination name; such domains are local too
    domains: dict[str, str] = field(default_factory=dict)
    # local domain → the address that receives mail for its unknown users
    catch_all: dict[str, str] = field(default_factory=dict)
    # named destinations, see DestinationConfig; "local" is predefined
    destinations: dict[str, DestinationConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "@" in self.recipient_delimiter:
            raise ValueError("recipient_delimiter: must not contain @")
        if not self.maildir_root.strip():
            # (it would store the mail in whatever directory the server started in)
            raise ValueError("maildir_root: must not be empty")
        if self.sync_method == "syncfs":
            problem = syncfs_problem(platform.system(), platform.release())
            if problem:
                raise ValueError(f"sync_method: {problem}")
        # A typo here would never match a recipient: the domain's mail would be refused.
        named = [(f"local_domains[{n}]", d) for n, d in enumerate(self.local_domains, 1)]
        named += [(dotted_key("domains", d), d) for d in self.domains]
        for key, domain in named:
            problem = domain_problem(domain, idna=True)
            if problem:
                raise ValueError(f"{key}: {problem}")
        # `postmaster = "root"` is the natural TOML for one target: store lists only
        self.aliases = {
            key: [value] if isinstance(value, str) else list(value)
            for key, value in self.aliases.items()
        }
        for key, targets in self.aliases.items():
            if not key or not targets or not all(targets):
                raise ValueError(f"{dotted_key('aliases', key)}: needs a name and at least one "
                                 "target")
        # A malformed name or target never matches or never delivers: its mail would be
        # refused for good (550), where the mistake is ours.
        named = [(dotted_key("aliases", key), key) for key in self.aliases]
        named += [(dotted_key("aliases", key), t) for key, targets in self.aliases.items()
                  for t in targets]
        named += [(dotted_key("users", key), key) for key in self.users]
        named += [(dotted_key("catch_all", key), target)
                  for key, target in self.catch_all.items()]
        for key, text in named:
            problem = address_problem(str(text))
            if problem:
                raise ValueError(f"{key}: {problem}")
        for key, targets in self.aliases.items():
            for target in targets:
                if target.startswith(("/", "|")):  # sendmail's file and program targets
                    raise ValueError(
                        f"{dotted_key('aliases', key)}: {target!r}: file and program targets "
                        "are not supported (route the address to an mbox or pipe destination)"
                    )
        for n, user in enumerate(self.local_users, 1):
            if "@" in user or address_problem(user):
                raise ValueError(f"local_users[{n}]: {user!r} is not a user name")
            if user in (".", "..") or "/" in user:  # (its mail would be refused: 553)
                raise ValueError(f"local_users[{n}]: {user!r} cannot name a mailbox")
        known = {LOCAL_DESTINATION, *self.destinations}
        references = [("default", self.default)]
        references += [("relay", self.relay)] if self.relay else []
        references += [(f"users.{k}", v) for k, v in self.users.items()]
        references += [(f"domains.{k}", v) for k, v in self.domains.items()]
        for key, name in references:
            if name not in known:
                raise ValueError(f"{key}: no destination named {name!r}")
