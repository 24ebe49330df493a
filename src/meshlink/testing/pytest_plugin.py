"""pytest plugin (registered through the ``pytest11`` entry point): meshlink fixtures."""

from __future__ import annotations

import uuid

import pytest

from meshlink.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    """A :class:`~meshlink.clock.FakeClock` that moves only when the test advances it."""
    return FakeClock()


@pytest.fixture
def memory_url() -> str:
    """A ``memory://`` URL naming a broker private to this test."""
    return f"memory://test-{uuid.uuid4().hex[:12]}"
