"""Fixtures of the in-process session tests (see harness.py)."""

from __future__ import annotations

import pytest

from mailgate.ops.logging import SessionLog

Logged = list[tuple[str, dict[str, object]]]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Logged:
    """Every session log line, as (event name, fields), in the order they are made."""
    lines: Logged = []
    real = SessionLog.event

    def event(self: SessionLog, name: str, /, level: str = "info", **fields: object) -> None:
        lines.append((name, fields))
        real(self, name, level, **fields)

    monkeypatch.setattr(SessionLog, "event", event)
    return lines
