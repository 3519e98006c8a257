"""Options shared by every test folder."""

from __future__ import annotations

import pytest
from hypothesis import settings

# No deadline for property tests: they check behaviour, not speed (speed is measured
# by bench/, never by timed assertions), and an example that runs slowly on a loaded
# two-core CI machine, or while a new interpreter compiles the modules it imports,
# must not fail the suite as "flaky".
settings.register_profile("mailgate", deadline=None)
settings.load_profile("mailgate")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False,
        help="run the long variants of the hardening tests (by hand, minutes each)",
    )
