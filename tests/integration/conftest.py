from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server import RunningServer, start_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """mailgate on its embedded defaults (plus a temporary maildir and spool)."""
    running = start_server(tmp_path)
    yield running
    running.stop()
