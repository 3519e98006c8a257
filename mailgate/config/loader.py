"""Load the TOML configuration into the :class:`Config` dataclasses and validate it.

The loader knows no section by name: it walks the dataclasses' type hints, so a field
added to any section file is read and type-checked with no change here.  Every problem
becomes one ``FILE: section.key: what is wrong`` line, and all of them are collected
before :class:`ConfigError` is raised, so an operator fixes a file in one pass and
never sees a traceback.

Besides types, a few cheap checks are chosen by field name (see docs/configuration.md):

* ``address`` and ``*_address`` (HOST:PORT, [IPv6]:PORT, or a Unix socket as ``/path``
  or ``unix:/path``), ``listen`` and ``*_listen`` (HOST:PORT only) must parse;
* ``*_networks``, ``*_from`` and ``*cidr*`` entries must be IP networks;
* ``*_file``, ``cert`` and ``key``, when not empty, must name a readable file
  (a field may opt in or out with ``field(metadata={"must_exist": bool})``);
* numbers must be finite, ``*timeout*`` more than 0, and ``max_*``, ``*delay*`` and
  ``*grace*`` must not be negative.

A dataclass ``__post_init__`` may raise ``ValueError("key: what is wrong")``; the
loader turns it into ``FILE: section.key: what is wrong``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import stat
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from mailgate.config.errors import ConfigError
from mailgate.config.names import HOST, dotted_key
from mailgate.config.schema import Config

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # far above any real config; stops a hostile huge file
MAX_REPORTED_ERRORS = 100  # a garbage file must not print a million lines
DEFAULTS_NAME = "<defaults>"  # the "file" named in errors about the embedded defaults

# tomllib takes time and memory quadratic in the parts of one dotted key: a 40 KB
# line "x.a.a.a...= 1" took seconds and GBs.  The deepest real key has five parts
# (delivery.destinations.NAME.smtp.host); a chain of more than this is refused first,
# and so is a file of more dotted parts in all than any real one has (each may make a
# table: 4 MB of 31-part keys took 11 s and 830 MB).
MAX_KEY_PARTS = 32
MAX_DOTTED_PARTS = 10_000
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
# Dotted chains outside strings and comments: a value's "example.org" or 127.0.0.1
# is no key (6,000 aliases of addresses were refused as too many dotted parts).  The
# chain is tried first, as one may start with a quoted part ("a".b).
_KEY_CHAIN = re.compile(
    rf"(?P<chain>{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})+)"
    r'''|"""(?:[^\\]|\\[\s\S])*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|#[^\n]*'''
)
_KEY_PARTS = re.compile(_KEY_PART)
_TOML_POSITION = re.compile(
    r"^(?P<msg>.*?) \((?:at line (?P<line>\d+), column (?P<col>\d+)|at end of document)\)$"
)
_NON_NEGATIVE_WORDS = ("delay", "grace")  # and *timeout* must be more than 0
_INVALID = object()
_INT_MAX = 2**63 - 1
T = typing.TypeVar("T")  # marks a value that produced an error, so its parents are not built


def load_config(path: str | None, absent_ok: Collection[str] = ()) -> Config:
    """Read and validate the configuration at ``path`` (None: the embedded defaults).

    ``absent_ok``: keys (e.g. "auth.users_file") whose file may not exist yet: for
    the command that makes it.  Raises :class:`ConfigError` listing every problem
    found; nothing else escapes.
    """
    if path is None:
        return from_data(_to_raw(Config()), DEFAULTS_NAME)
    return from_data(_read_toml(path), path, absent_ok=absent_ok)


@dataclasses.dataclass
class Findings:
    """What check-config found beyond the file's own syntax and values."""

    problems: list[str] = dataclasses.field(default_factory=list)  # serve would refuse
    warnings: list[str] = dataclasses.field(default_factory=list)  # serve starts; some mail fails


def check_config_command(
    path: str, check_parts: Callable[[Config], Findings] | None = None
) -> int:
    """``mailgate check-config FILE``: validate without starting; the exit status.

    ``check_parts`` (the caller's: this package builds nothing) tries what the file
    names (certificates, users file, access list) and returns what it found: problems
    make the status 1, warnings are printed and leave it 0.
    """
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    found = check_parts(config) if check_parts else Findings()
    for line in found.problems:
        print(naming_file(path, line), file=sys.stderr)
    for line in found.warnings:
        print(f"{path}: warning: {line}", file=sys.stderr)
    if found.problems:
        return 1
    print(f"{path}: OK")
    return 0


def naming_file(path: str | None, text: str) -> str:
    """``text`` (one problem a line) as FILE: KEY: problem, as the loader's own lines
    are; a line naming its file already (a ConfigError's, or the users file's or
    access list's /path:LINE:) stays as it is, as does all with no file (``path``
    None: the built-in defaults)."""
    if path is None:
        return text
    return "\n".join(line if line.startswith((f"{path}: ", "/")) else f"{path}: {line}"
                     for line in text.split("\n"))


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); ValueError says what is wrong."""
    shown = json.dumps(value, ensure_ascii=False)
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPv6]:PORT, got {shown}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{json.dumps(host)} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, got {shown}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in [::1]:25; got {shown}")
        if not host:
            raise ValueError(f"missing host in {shown} (0.0.0.0 or [::] listen on all addresses)")
        shown_host = json.dumps(host, ensure_ascii=False)
        if not HOST.fullmatch(host):
            raise ValueError(f"{shown_host} is not a host name or address")
        # No top-level domain is all digits (RFC 3696 2): such a host is meant as an
        # IPv4 address, and "300.1.1.1" would only fail later, as an unknown name.
        if host.rstrip(".").rpartition(".")[2].isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{shown_host} is not an IPv4 address") from None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"port must be a number from 0 to 65535, got {json.dumps(port)}")
    return host, int(port)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        # Non-blocking: a FIFO, or a procfs file such as /proc/kmsg that passes for a
        # regular one, must not hang check-config, the start or a reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError([f"{path}: not a regular file"])
            data = b""
            while len(data) <= MAX_CONFIG_BYTES and (chunk := os.read(fd, 1 << 20)):
                data += chunk
        finally:
            os.close(fd)
    except BlockingIOError:  # (non-blocking, and nothing to read now: no plain file)
        raise ConfigError([f"{path}: cannot read: not a plain file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: file is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}: line {line}: not UTF-8 text"]) from None
    _check_dotted_keys(path, text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {_toml_message(str(exc))}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: arrays or tables nested too deeply"]) from None


def _check_dotted_keys(path: str, text: str) -> None:
    """ConfigError for a dotted key or a file too costly for tomllib (see above)."""
    total = 0
    for chain in _KEY_CHAIN.finditer(text):  # one pass: each match consumes its text
        found = chain.group("chain")
        if found is None:
            continue  # a string or a comment
        dots = found.count(".")
        if dots < MAX_KEY_PARTS and total + dots <= MAX_DOTTED_PARTS:
            total += dots  # (dots in quoted parts too: an upper bound, cheap)
            continue
        parts = len(_KEY_PARTS.findall(found))
        line = text.count("\n", 0, chain.start()) + 1
        if parts > MAX_KEY_PARTS:
            raise ConfigError([f"{path}: line {line}: a key of more than {MAX_KEY_PARTS} "
                               "dotted parts"])
        total += parts - 1
        if total > MAX_DOTTED_PARTS:
            raise ConfigError([f"{path}: line {line}: more than {MAX_DOTTED_PARTS} dotted "
                               "key parts in the file"])


def _toml_message(message: str) -> str:
    """tomllib's "Invalid value (at line 2, column 5)" → "line 2, column 5: invalid value"."""
    m = _TOML_POSITION.match(message)
    if not m:
        return message
    where = f"line {m['line']}, column {m['col']}" if m["line"] else "end of file"
    text = m["msg"]
    return f"{where}: {text[:1].lower()}{text[1:]}"


def from_data(
    raw: dict[str, Any], filename: str, schema: type[T] = Config, absent_ok: Collection[str] = ()
) -> T:
    """Build ``schema`` (a config dataclass) from parsed TOML; errors name ``filename``."""
    converter = _Converter(filename, absent_ok)
    config = converter.section(schema, raw, "")
    if converter.errors:
        errors = converter.errors
        if len(errors) > MAX_REPORTED_ERRORS:
            hidden = len(errors) - MAX_REPORTED_ERRORS
            errors = [*errors[:MAX_REPORTED_ERRORS], f"{filename}: ... and {hidden} more errors"]
        raise ConfigError(errors)
    return typing.cast(T, config)


def _to_raw(obj: object) -> object:
    """A dataclass tree back to the plain values TOML would give (init fields only)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _to_raw(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init and not f.name.startswith("_") and getattr(obj, f.name) is not None
        }
    if isinstance(obj, list):
        return [_to_raw(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_raw(v) for k, v in obj.items()}
    return obj


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a config dataclass (the annotations are strings)."""
    return get_type_hints(cls)


def config_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a config dataclass that a TOML file can set."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _shown(value: object) -> str:
    """A TOML value as an error message shows it: short, one line, quoted if a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
        return text
    if isinstance(value, int) and abs(value) > _INT_MAX:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _described(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_shown(v) for v in get_args(tp))
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if all(get_origin(a) is Literal for a in arms):  # Literal["a"] | Literal[""]
            return _described(Literal[tuple(v for a in arms for v in get_args(a))])
        return " or ".join(_described(a) for a in arms)
    if origin is list:
        return "an array"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Converter:
    """Turns parsed TOML into dataclasses, collecting ``file: key: problem`` lines."""

    def __init__(self, filename: str, absent_ok: Collection[str] = ()) -> None:
        self.filename = filename
        self.errors: list[str] = []
        self.absent_ok = frozenset(absent_ok)

    def error(self, key: str, message: str) -> None:
        where = f"{key}: " if key else ""
        self.errors.append(f"{self.filename}: {where}{message}")

    def section(self, cls: type, raw: object, key: str) -> object:
        if not isinstance(raw, dict):
            self.error(key, f"expected a table, got {_shown(raw)}")
            return _INVALID
        fields = {f.name: f for f in config_fields(cls)}
        hints = field_types(cls)
        kwargs: dict[str, object] = {}
        failed = False
        for name, value in raw.items():
            sub = dotted_key(key, name)
            field = fields.get(name)
            if field is None:
                close = difflib.get_close_matches(name, list(fields), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.error(sub, f"unknown key{hint}")
                failed = True
                continue
            before = len(self.errors)
            converted = self.value(hints[name], value, sub)
            if len(self.errors) == before:
                self.check_field(field, converted, sub)
            if len(self.errors) > before:
                failed = True
            else:
                kwargs[name] = converted
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING
            if required and field.default_factory is dataclasses.MISSING and name not in raw:
                self.error(dotted_key(key, name), "required key is missing")
                failed = True
        if failed:
            return _INVALID  # no __post_init__ on half a section: its errors would be noise
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            self.post_init_error(cls, fields, key, str(exc))
            return _INVALID

    def post_init_error(self, cls: type, fields: dict[str, Any], key: str, message: str) -> None:
        """Place a ``__post_init__`` message under the section's key.

        Section files write ``"key: problem"``, ``"section.key: problem"`` or
        ``"destination.key: problem"`` (the class name); all become ``section.key``.
        """
        own_names = {
            re.sub(r"\[\d+\]$", "", key.rpartition(".")[2]).strip('"'),
            cls.__name__.removesuffix("Config").lower(),
        }
        for name in own_names - {""}:
            if message.startswith(f"{name}:"):
                self.error(key, message[len(name) + 1 :].strip())
                return
            if message.startswith(f"{name}."):
                message = message[len(name) + 1 :]
                break
        first = re.match(r"\w+", message)
        if first and first[0] in fields and message[first.end() : first.end() + 1] in ":.[":
            self.errors.append(
                f"{self.filename}: {key}.{message}" if key else f"{self.filename}: {message}"
            )
        else:
            self.error(key, message)

    def value(self, tp: Any, raw: object, key: str) -> object:
        origin = get_origin(tp)
        if tp is Any:
            return raw
        if origin is Literal:
            allowed = get_args(tp)
            if isinstance(raw, bool) or raw not in allowed:
                self.error(key, f"expected {_described(tp)}, got {_shown(raw)}")
                return _INVALID
            return raw
        if origin in (Union, types.UnionType):
            return self.union(tp, raw, key)
        if origin is list:
            return self.array(get_args(tp)[0], raw, key)
        if origin is dict:
            return self.table(get_args(tp)[1], raw, key)
        if dataclasses.is_dataclass(tp):
            return self.section(tp, raw, key)
        return self.scalar(tp, raw, key)

    def union(self, tp: Any, raw: object, key: str) -> object:
        arms = [a for a in get_args(tp) if a is not type(None)]
        if len(arms) == 1:  # X | None: TOML has no null, so a present key is always an X
            return self.value(arms[0], raw, key)
        shaped: list[str] = []  # the errors of the arm raw has the shape of
        for arm in arms:
            trial = _Converter(self.filename)
            converted = trial.value(arm, raw, key)
            if not trial.errors:
                return converted
            container = {list: list, dict: dict}.get(get_origin(arm))
            if container is not None and isinstance(raw, container):
                shaped = trial.errors
        if shaped:  # an array of the wrong items: say which (not "expected an array")
            self.errors.extend(shaped)
            return _INVALID
        self.error(key, f"expected {_described(tp)}, got {_shown(raw)}")
        return _INVALID

    def array(self, item: Any, raw: object, key: str) -> object:
        if not isinstance(raw, list):
            self.error(key, f"expected an array, got {_shown(raw)}")
            return _INVALID
        return [self.value(item, v, f"{key}[{i}]") for i, v in enumerate(raw, 1)]

    def table(self, item: Any, raw: object, key: str) -> object:
        if not isinstance(raw, dict):
            self.error(key, f"expected a table, got {_shown(raw)}")
            return _INVALID
        return {k: self.value(item, v, dotted_key(key, k)) for k, v in raw.items()}

    def scalar(self, tp: Any, raw: object, key: str) -> object:
        if tp is bool:
            ok = isinstance(raw, bool)
        elif tp is int:
            ok = isinstance(raw, int) and not isinstance(raw, bool)
            if ok and abs(typing.cast(int, raw)) > _INT_MAX:
                # (TOML integers are unbounded in tomllib; every count, size and port
                # here fits in 64 bits, and SIZE may advertise 20 digits at most)
                self.error(key, f"{_shown(raw)} is out of range (at most {_INT_MAX})")
                return _INVALID
        elif tp is float:
            ok = isinstance(raw, int | float) and not isinstance(raw, bool)
            if ok:
                try:
                    raw = float(typing.cast(float, raw))
                except OverflowError:  # an integer of hundreds of digits
                    self.error(key, f"expected a finite number, got {_shown(raw)}")
                    return _INVALID
        elif tp is str:
            ok = isinstance(raw, str)
            if ok and "\0" in typing.cast(str, raw):
                # (no path, name or address holds one; open() and friends raise on it)
                self.error(key, "must not contain a NUL character")
                return _INVALID
        else:
            raise TypeError(f"config field {key} has a type the loader cannot read: {tp!r}")
        if not ok:
            self.error(key, f"expected {_described(tp)}, got {_shown(raw)}")
            return _INVALID
        return raw

    def check_field(self, field: dataclasses.Field[Any], value: object, key: str) -> None:
        """The cheap semantic checks chosen by the field's name (module docstring)."""
        name = field.name
        self.check_numbers(name, value, key)
        if name in ("address", "listen") or name.endswith(("_address", "_listen")):
            for sub, text in _strings(value, key):
                # an address (not a listen) may name a Unix socket: "/path" or "unix:/path"
                socket_path = text.startswith(("/", "unix:/")) and "listen" not in name
                if not text and name == "address":  # (only *_address and listen mean off)
                    self.error(sub, "must not be empty")
                elif text.startswith("unix:") and not socket_path and "listen" not in name:
                    self.error(sub, f"a Unix socket's path must be absolute: {_shown(text)}")
                elif text and not socket_path:
                    try:
                        split_host_port(text)
                    except ValueError as exc:
                        self.error(sub, str(exc))
        if name.endswith(("_networks", "_from")) or "cidr" in name:
            for sub, text in _strings(value, key):
                try:
                    ipaddress.ip_network(text, strict=False)
                except ValueError:
                    self.error(sub, f"{_shown(text)} is not an IP address or network (CIDR)")
                    continue
                try:  # "10.1.2.3/8" meant one host or the whole /8: say which
                    ipaddress.ip_network(text, strict=True)
                except ValueError as exc:
                    self.error(sub, f"{_shown(text)}: {exc}")
        if field.metadata.get("must_exist", _names_a_file(name)):
            for sub, text in _strings(value, key):
                if text:
                    self.check_file(text, sub)
        for sub, entry, text in _table_strings(value, key):  # e.g. tls.certificates[1].cert
            if text and _names_a_file(entry):
                self.check_file(text, sub)

    def check_numbers(self, name: str, value: object, key: str) -> None:
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items, 1):
            sub = f"{key}[{i}]" if isinstance(value, list) else key
            if isinstance(v, float) and not math.isfinite(v):
                self.error(sub, f"expected a finite number, got {v!r}")
            elif "timeout" in name and isinstance(v, int | float) and v <= 0:
                # 0 would not mean "no timeout": every wait would fail at once
                self.error(sub, f"must be more than 0 seconds, got {v!r}")
            elif (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and v < 0
                and (name.startswith("max_") or any(w in name for w in _NON_NEGATIVE_WORDS))
            ):
                self.error(sub, f"must not be negative, got {v!r}")

    def check_file(self, path: str, key: str) -> None:
        shown = json.dumps(path, ensure_ascii=False)
        try:
            info = os.stat(path)
        except FileNotFoundError as exc:
            if key not in self.absent_ok:
                self.error(key, f"cannot use {shown}: {exc.strerror or exc}")
            return
        except OSError as exc:
            self.error(key, f"cannot use {shown}: {exc.strerror or exc}")
            return
        if not stat.S_ISREG(info.st_mode):
            self.error(key, f"{shown} is not a regular file")
        elif not os.access(path, os.R_OK):
            self.error(key, f"{shown} is not readable")


def _strings(value: object, key: str) -> list[tuple[str, str]]:
    """The strings of a str or list[str] field, each with its key for error messages."""
    if isinstance(value, str):
        return [(key, value)]
    if isinstance(value, list):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value, 1) if isinstance(v, str)]
    return []


def _table_strings(value: object, key: str) -> list[tuple[str, str, str]]:
    """(key, entry name, string) for the string entries of dict[str, str] values."""
    tables = enumerate(value, 1) if isinstance(value, list) else []
    found = []
    for i, table in tables:
        if isinstance(table, dict):
            for name, text in table.items():
                if isinstance(text, str):
                    found.append((dotted_key(f"{key}[{i}]", name), name, text))
    return found


def _names_a_file(name: str) -> bool:
    return name.endswith("_file") or name in ("cert", "key")
