from __future__ import annotations

import resource

import pytest


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``pytest --long``: the hardening tests then run their long variants."""
    return bool(request.config.getoption("--long"))


@pytest.fixture(scope="session", autouse=True)
def _many_descriptors() -> None:
    """Room for thousands of sockets here and in the servers we start (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 65536), hard))
