"""docs/configuration.md documents every key, and the shipped example config loads."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from mailgate.config.loader import config_fields, field_types, load_config
from mailgate.config.schema import Config
from mailgate.supervisor import KILL_AFTER

ROOT = Path(__file__).resolve().parents[2]
SCALARS = (int, float, bool, str)


def keys(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every settable key as the docs write it, with its type.

    A ``[[listener]]`` list documents its keys as ``listener.KEY``; a table of
    sections as ``section.NAME.KEY``; an optional section as ``section.KEY``.
    """
    for field in config_fields(cls):
        path = f"{prefix}.{field.name}" if prefix else field.name
        tp = field_types(cls)[field.name]
        yield path, tp
        section = _section_of(tp)
        if section is not None:
            inner, suffix = section
            yield from keys(inner, path + suffix)


def _section_of(tp: Any) -> tuple[type, str] | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return typing.cast(type, tp), ""
    if origin is list and dataclasses.is_dataclass(args[0]):
        return args[0], ""
    if origin is dict and dataclasses.is_dataclass(args[1]):
        return args[1], ".NAME"
    arms = [a for a in args if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(arms) == 1:
        return _section_of(arms[0])
    return None


def readable(tp: Any) -> bool:
    """A type the loader can read (test_config_loader covers each kind)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in SCALARS or dataclasses.is_dataclass(tp) or origin is Literal:
        return True
    if origin is list:
        return readable(args[0])
    if origin is dict:
        return args[0] is str and readable(args[1])
    if origin in (typing.Union, types.UnionType):
        return all(readable(a) for a in args if a is not type(None))
    return False


ALL_KEYS = list(keys(Config))


def test_the_schema_has_keys() -> None:
    paths = [path for path, _ in ALL_KEYS]
    assert "server.max_recipients" in paths and "listener.address" in paths
    assert "delivery.destinations.NAME.mbox.path" in paths


@pytest.mark.parametrize(("path", "tp"), ALL_KEYS, ids=[p for p, _ in ALL_KEYS])
def test_every_key_is_documented(path: str, tp: Any) -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    # a section is documented by its table header, a key by its dotted path
    forms = [f"`{path}`"] if "." in path else [f"`[{path}]`", f"`[[{path}]]`"]
    assert any(form in text for form in forms), f"docs/configuration.md lacks {forms[0]}"


@pytest.mark.parametrize(("path", "tp"), ALL_KEYS, ids=[p for p, _ in ALL_KEYS])
def test_every_key_has_a_type_the_loader_reads(path: str, tp: Any) -> None:
    assert readable(tp), f"{path}: the config loader cannot read {tp!r}"


def test_the_example_config_loads() -> None:
    config = load_config(str(ROOT / "deploy" / "mailgate.example.toml"))
    assert config.server.hostname == "mx.example.org"
    assert [listener.role for listener in config.listener] == ["public"]
    assert config.metrics.listen == "127.0.0.1:9125"


def test_the_example_submission_listeners_load_once_a_certificate_is_set(
    tmp_path: Path,
) -> None:
    # What the example tells an administrator to do: set cert and key, uncomment the
    # two submission listeners.
    import trustme

    cert = trustme.CA().issue_cert("mx.example.org")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    lines = (ROOT / "deploy" / "mailgate.example.toml").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Submission"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "[tls]")
    for i in range(start + 2, end):
        lines[i] = lines[i].removeprefix("# ").removeprefix("#")
    for i, line in enumerate(lines):
        if line.startswith("# cert = "):
            lines[i] = f'cert = "{tmp_path}/cert.pem"'
        elif line.startswith("# key = "):
            lines[i] = f'key = "{tmp_path}/key.pem"'
    edited = tmp_path / "mailgate.toml"
    edited.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = load_config(str(edited))
    assert [listener.role for listener in config.listener] == ["public", "submission", "smtps"]
    assert config.listener[1].require_tls


def test_the_unit_file_waits_longer_than_the_shutdown_grace() -> None:
    """systemd must not SIGKILL sessions that are still within shutdown_grace."""
    unit = (ROOT / "deploy" / "mailgate.service").read_text(encoding="utf-8")
    stop = next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec="))
    example = load_config(str(ROOT / "deploy" / "mailgate.example.toml"))
    grace = max(example.server.shutdown_grace, Config().server.shutdown_grace)
    # the supervisor kills a worker still running KILL_AFTER seconds after the grace
    assert int(stop.removeprefix("TimeoutStopSec=")) > grace + KILL_AFTER
    assert "ExecStart=/usr/local/bin/mailgate serve --config /etc/mailgate/mailgate.toml" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
